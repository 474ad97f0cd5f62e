"""vqkernels.nn.EvoLFQ as a drop-in for vector-quantize-pytorch 1.32.0's: their state_dict loads; the same
reconstructions, indices, aux losses and gradients over training steps (its LFQ is vqkernels.nn.LFQ); the same
populations from the same seed through every genetic operator, step and evolve; encode / decode_bits; odd inputs,
torch.compile."""

import copy
import math

import pytest
import torch
import vector_quantize_pytorch as vqp
from torch import nn
from vector_quantize_pytorch.evo_lookup_free_quantization import EvoLFQ as TheirEvoLFQ

from nn_helpers import assert_compiled_training_matches_eager
from vq_helpers import gen, vqkernels  # noqa: F401  (loads the ops, quietly without the extension)
from vqkernels.nn import LFQ, EvoLFQ
from vqkernels.nn.evo_lfq import Result, Return


def _mlp(d_in, d_out):
    return nn.Sequential(nn.Linear(d_in, 16), nn.Dropout(0.1), nn.GELU(), nn.Linear(16, d_out))


# (encoder and decoder makers, EvoLFQ keywords, input shape)
CASES = {
    "tokens": (lambda: (_mlp(10, 8), _mlp(8, 10)), dict(dim=8), (2, 9, 10)),
    "one-token-per-sample": (lambda: (_mlp(10, 6), _mlp(6, 10)), dict(dim=6, entropy_loss_weight=0.3), (5, 10)),
    "projections-2-codebooks-commit": (lambda: (_mlp(10, 12), _mlp(12, 10)),
                                       dict(dim=12, codebook_size=2 ** 5, num_codebooks=2,
                                            commitment_loss_weight=0.25), (2, 7, 10)),
    "image": (lambda: (nn.Conv2d(3, 6, 1), nn.Conv2d(6, 3, 1)), dict(dim=6, diversity_gamma=2.0), (2, 3, 4, 5)),
    "spherical-scaled": (lambda: (_mlp(10, 7), _mlp(7, 10)), dict(dim=7, spherical=True, codebook_scale=1.5),
                         (3, 6, 10)),
}
# the cases whose decoder reads channel-last codes (decode_bits' layout) and whose LFQ has no projections
TOKEN_CASES = ["tokens", "one-token-per-sample", "spherical-scaled"]


def _pair(case, **extra):
    make, kw, _ = CASES[case]
    torch.manual_seed(0)
    encoder, decoder = make()
    theirs = TheirEvoLFQ(copy.deepcopy(encoder), copy.deepcopy(decoder), **kw, **extra)
    ours = EvoLFQ(encoder, decoder, **kw, **extra)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert isinstance(ours.lfq, LFQ)
    return theirs, ours


def _aux_tolerance(lfq):
    """vqkernels.nn.LFQ's per-sample entropy is the exact one, theirs clamps every code probability at 1e-5: ours is
    higher by at most 2**d * 1e-5 / e per token (see tests/test_nn_fsq_lfq.py); the rest is float32 rounding."""
    clamp = 2 ** lfq.codebook_dim * 1e-5 / math.e
    return lfq.entropy_loss_weight * (clamp + (1 + abs(lfq.diversity_gamma)) * 1e-5) + lfq.commitment_loss_weight * 1e-6


@pytest.mark.parametrize("inv_temperature", [100.0, 1.0])
@pytest.mark.parametrize("case", CASES)
def test_training_matches_vector_quantize_pytorch(case, inv_temperature):
    """Three SGD steps of both (dropout in the encoders drawn from one seed): indices equal, reconstructions and
    input / parameter gradients of sum(reconstructed * G) + aux loss within float32 rounding and the entropy clamp's
    share (1e-3 of the largest), the aux loss within _aux_tolerance."""
    theirs, ours = _pair(case)
    shape = CASES[case][2]
    theirs.train(), ours.train()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (theirs, ours)]
    for step in range(3):
        x = torch.randn(shape, generator=gen(step))
        got = []
        for layer, opt in zip((theirs, ours), opts):
            torch.manual_seed(10 + step)
            xx = x.clone().requires_grad_()
            out = layer(xx, inv_temperature=inv_temperature)
            g = torch.randn(out.reconstructed.shape, generator=gen(20 + step))
            opt.zero_grad()
            ((out.reconstructed * g).sum() + out.entropy_aux_loss).backward()
            got.append((out, xx.grad, [p.grad.clone() for p in layer.parameters()]))
            opt.step()
        (a, ga, pa), (b, gb, pb) = got
        assert isinstance(b, Return)
        assert torch.equal(b.indices, a.indices) and b.indices.shape == a.indices.shape
        torch.testing.assert_close(b.reconstructed, a.reconstructed, rtol=1e-5, atol=1e-5)
        assert abs(float((b.entropy_aux_loss - a.entropy_aux_loss).detach())) <= _aux_tolerance(ours.lfq)
        for name, want, have in [("x", ga, gb)] + [(f"param {i}", p, q) for i, (p, q) in enumerate(zip(pa, pb))]:
            torch.testing.assert_close(have, want, rtol=0, atol=1e-3 * float(want.abs().max()),
                                       msg=lambda m, name=name: f"step {step} {name}: {m}")


@pytest.mark.parametrize("case", CASES)
def test_eval_forward_encode_and_decode_bits_match(case):
    """Eval: forward bitwise as theirs; decode_bits of 0/1 and -1/+1 bits of any leading shape bitwise as theirs;
    encode as theirs without LFQ projections (with them ours gives the code bits, theirs the projected signs)."""
    theirs, ours = _pair(case)
    x = torch.randn(CASES[case][2], generator=gen(3))
    theirs.eval(), ours.eval()
    a, b = theirs(x), ours(x)
    assert torch.equal(b.reconstructed, a.reconstructed) and torch.equal(b.indices, a.indices)
    assert float(b.entropy_aux_loss) == float(a.entropy_aux_loss) == 0.0
    if case != "image":  # theirs and ours feed the decoder channel-last codes
        for shape in [(ours.num_bits,), (5, ours.num_bits), (4, 3, ours.num_bits)]:
            bits = torch.randint(0, 2, shape, generator=gen(4)).float()
            assert torch.equal(ours.decode_bits(bits), theirs.decode_bits(bits))
            assert torch.equal(ours.decode_bits(bits * 2 - 1), theirs.decode_bits(bits))
    mine = ours.encode(x), ours.encode(x, return_signs=True)
    assert torch.equal(mine[1], mine[0] * 2 - 1) and set(mine[0].unique().tolist()) <= {0.0, 1.0}
    if ours.lfq.has_projections:
        assert mine[0].shape[-1] == ours.num_bits != theirs.encode(x).shape[-1] == ours.lfq.dim
    else:
        assert torch.equal(mine[0], theirs.encode(x)) and torch.equal(mine[1], theirs.encode(x, return_signs=True))


@pytest.mark.parametrize("case", TOKEN_CASES + ["projections-2-codebooks-commit"])
def test_encode_then_decode_bits_reconstructs(case):
    """decode_bits(encode(x)) is the eval reconstruction, also with LFQ projections (theirs' encode there gives
    the signs of the projected output, which its decode_bits cannot read)."""
    theirs, ours = _pair(case)
    x = torch.randn(CASES[case][2], generator=gen(5))
    ours.eval()
    torch.testing.assert_close(ours.decode_bits(ours.encode(x)), ours(x).reconstructed, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.decode_bits(ours.encode(x, return_signs=True)), ours(x).reconstructed,
                               rtol=1e-6, atol=1e-6)
    if case == "projections-2-codebooks-commit":
        with pytest.raises(RuntimeError):
            theirs.decode_bits(theirs.encode(x))


def test_genetic_operators_match_with_the_same_seed():
    """init_random_population, init_population_from_data (fewer and more samples than the population, 0/1 and
    -1/+1, mutation off), mutate, uniform_crossover and tournament_selection: theirs' populations bit for bit."""
    theirs, ours = _pair("tokens", pop_size=12, mutation_rate=0.2, tournament_size=3)
    x = torch.randn(5, 9, 10, generator=gen(6))
    fit = torch.randn(12, generator=gen(7))
    calls = [
        lambda m: m.init_random_population(shape=(4, 8)),
        lambda m: m.init_random_population(pop_size=7, shape=(8,), is_sign=True),
        lambda m: m.init_population_from_data(x),
        lambda m: m.init_population_from_data(x, pop_size=3, is_sign=True, mutation_rate=0.5),
        lambda m: m.init_population_from_data(x, mutation_rate=0.0),
        lambda m: m.mutate(torch.ones(12, 4, 8)),
        lambda m: m.mutate(torch.ones(12, 8), mutation_rate=0.5, is_sign=True),
        lambda m: m.uniform_crossover(torch.zeros(12, 3, 8), torch.ones(12, 3, 8)),
        lambda m: m.tournament_selection(torch.arange(12.0).unsqueeze(-1).expand(12, 8), fit),
        lambda m: m.tournament_selection(torch.arange(12.0).unsqueeze(-1), fit, tournament_size=5),
    ]
    for i, call in enumerate(calls):
        torch.manual_seed(i)
        want = call(theirs)
        torch.manual_seed(i)
        have = call(ours)
        assert have.dtype == want.dtype and torch.equal(have, want), i
    # the operators do what they say
    torch.manual_seed(0)
    flipped = ours.mutate(torch.zeros(200, 50), mutation_rate=0.1)
    assert abs(float(flipped.mean()) - 0.1) < 0.01
    child = ours.uniform_crossover(torch.zeros(200, 50), torch.ones(200, 50))
    assert abs(float(child.mean()) - 0.5) < 0.02
    winners = ours.tournament_selection(torch.arange(12.0), torch.arange(12.0), tournament_size=12)
    assert float(winners.mean()) > 8  # 12 draws from 12: the best of them is usually near the top
    pop = ours.init_population_from_data(x, pop_size=12, mutation_rate=0.0)
    assert torch.equal(pop, ours.encode(x)[torch.arange(12) % 5])


def _fitness_to(target):
    return lambda decoded, bits: -(decoded - target).square().flatten(1).sum(-1)


@pytest.mark.parametrize("kw", [dict(), dict(elitism_count=0, is_sign=True), dict(elitism_count=3, batch_size=5),
                                dict(tournament_size=4, mutation_rate=0.3, as_list=True)],
                         ids=["default", "no-elites-signs", "three-elites-batched", "list-fitness"])
def test_step_matches_with_the_same_seed(kw):
    """step: the next population and the fitnesses bitwise as theirs; the elites are the best genes scored."""
    kw = dict(kw)
    as_list = kw.pop("as_list", False)
    theirs, ours = _pair("projections-2-codebooks-commit", pop_size=11)
    score = _fitness_to(torch.randn(10, generator=gen(8)))
    fitness_fn = (lambda d, b: score(d, b).tolist()) if as_list else score
    torch.manual_seed(1)
    pop = ours.init_random_population(shape=(3, ours.num_bits), is_sign=kw.get("is_sign", False))
    results = []
    for layer in (theirs, ours):
        torch.manual_seed(2)
        results.append(layer.step(pop, fitness_fn, **kw))
    (next_t, fit_t), (next_o, fit_o) = results
    assert torch.equal(next_o, next_t) and torch.equal(fit_o, fit_t)
    assert next_o.shape == pop.shape and fit_o.dtype == torch.float32
    elites = kw.get("elitism_count", 1)
    torch.testing.assert_close(score(ours.decode_bits(next_o[:elites]), None),
                               fit_o.sort(descending=True).values[:elites])
    assert ours.training and theirs.training


def test_evolve_matches_and_reports_the_gene_it_scored():
    """evolve: every generation's population and best fitness as theirs. best_gene is the gene that scored
    best_fitness (found here by scoring every population), and best_decoded its decoder output; theirs takes the
    best score's index in the next population, another gene in general."""
    theirs, ours = _pair("tokens", pop_size=16)
    score = _fitness_to(torch.randn(10, generator=gen(9)))
    torch.manual_seed(3)
    pop = ours.init_random_population(shape=(ours.num_bits,))
    runs = []
    for layer in (theirs, ours):
        torch.manual_seed(4)
        runs.append(list(layer.evolve(score, pop_bits=pop, generations=8, return_best_decoded=True)))
    assert len(runs[1]) == 8 and all(isinstance(r, Result) for r in runs[1])
    best, best_gene, scored = float("-inf"), None, pop
    for t, o in zip(*runs):
        assert torch.equal(o.pop_bits, t.pop_bits) and o.best_fitness == t.best_fitness
        fit = score(ours.decode_bits(scored), scored)
        if float(fit.max()) > best:
            best, best_gene = float(fit.max()), scored[fit.argmax()]
        assert o.best_fitness == best and torch.equal(o.best_gene, best_gene)
        assert torch.equal(o.best_decoded, ours.decode_bits(best_gene))
        torch.testing.assert_close(float(score(o.best_decoded[None], None)), o.best_fitness)
        scored = o.pop_bits


def test_evolve_finds_the_target_bits():
    """A fitness counting the bits equal to a target: from a random population of genes [2, 8] the search finds
    the target, and the best fitness never falls."""
    _, ours = _pair("tokens", pop_size=32, mutation_rate=0.05)
    target = torch.randint(0, 2, (2, 8), generator=gen(10)).float() * 2 - 1
    torch.manual_seed(5)
    results = list(ours.evolve(lambda _, bits: (bits == target).flatten(1).sum(-1).float(), shape=(2, 8),
                               is_sign=True, generations=40))
    fitness = [r.best_fitness for r in results]
    assert fitness == sorted(fitness) and fitness[0] < 16
    assert fitness[-1] == 16 and torch.equal(results[-1].best_gene, target)
    assert results[-1].pop_bits.shape == (32, 2, 8) and results[-1].best_decoded is None


def test_modes_are_restored_and_encode_is_deterministic():
    """encode / decode_bits / step run in eval mode (no dropout: other seeds, the same bits) and leave every
    submodule in the module's mode, as theirs."""
    _, ours = _pair("tokens")
    x = torch.randn(2, 9, 10, generator=gen(11))
    for training in (True, False):
        ours.train(training)
        torch.manual_seed(0)
        first = ours.encode(x)
        torch.manual_seed(1)
        assert torch.equal(ours.encode(x), first)
        ours.step(ours.init_random_population(shape=(8,)), lambda d, b: d.sum(-1))
        assert all(m.training == training for m in ours.modules())


def test_given_lfq_module_and_device():
    """An LFQ module given as ``lfq`` (theirs built with theirs'): their state_dict loads, eval results as theirs."""
    torch.manual_seed(0)
    encoder, decoder = _mlp(10, 10), _mlp(10, 10)
    theirs = TheirEvoLFQ(copy.deepcopy(encoder), copy.deepcopy(decoder), vqp.LFQ(dim=10, codebook_size=2 ** 4))
    ours = EvoLFQ(encoder, decoder, LFQ(dim=10, codebook_size=2 ** 4))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, 4, 10, generator=gen(12))
    theirs.eval(), ours.eval()
    assert torch.equal(ours(x).reconstructed, theirs(x).reconstructed)
    assert ours.num_bits == 4 and ours.device == torch.device("cpu")


def test_state_dict_round_trip():
    theirs, ours = _pair("projections-2-codebooks-commit")
    make, kw, shape = CASES["projections-2-codebooks-commit"]
    again = EvoLFQ(*make(), **kw)
    again.load_state_dict(ours.state_dict(), strict=True)
    fresh = TheirEvoLFQ(*make(), **kw)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(shape, generator=gen(13))
    want = ours.eval()(x).reconstructed
    assert torch.equal(again.eval()(x).reconstructed, want) and torch.equal(fresh.eval()(x).reconstructed, want)


@pytest.mark.parametrize("shape", [(2, 0, 10), (0, 3, 10), (1, 1, 10), (1, 10)])
def test_no_tokens_and_one_token(shape):
    """No tokens: empty reconstructions and indices, aux loss 0 (theirs: NaN), a gradient; one token as theirs."""
    theirs, ours = _pair("tokens")
    theirs.train(), ours.train()
    x = torch.randn(shape, generator=gen(14)).requires_grad_()
    torch.manual_seed(0)
    out = ours(x)
    assert out.reconstructed.shape == shape and out.indices.shape == shape[:-1]
    (out.reconstructed.sum() + out.entropy_aux_loss).backward()
    assert x.grad.shape == shape
    if x.numel():
        torch.manual_seed(0)
        want = theirs(x)
        assert torch.equal(out.indices, want.indices)
        torch.testing.assert_close(out.reconstructed, want.reconstructed)
    else:
        assert float(out.entropy_aux_loss.detach()) == 0.0


def test_float64():
    """A float64 model (LFQ quantizes in float32, as theirs): eval bitwise as theirs, training close."""
    theirs, ours = _pair("tokens")
    theirs.double(), ours.double()
    x = torch.randn(2, 9, 10, generator=gen(15), dtype=torch.float64)
    theirs.eval(), ours.eval()
    assert torch.equal(ours(x).reconstructed, theirs(x).reconstructed)
    assert ours.decode_bits(ours.encode(x)).dtype == torch.float64
    theirs.train(), ours.train()
    torch.manual_seed(0)
    a = theirs(x)
    torch.manual_seed(0)
    b = ours(x)
    assert b.reconstructed.dtype == torch.float64 and torch.equal(b.indices, a.indices)
    torch.testing.assert_close(b.reconstructed, a.reconstructed)


def test_bad_inputs_are_clear_errors():
    _, ours = _pair("tokens")
    with pytest.raises(ValueError, match=r"LFQ: expected the feature dimension 8"):
        EvoLFQ(nn.Linear(10, 7), nn.Linear(8, 10), dim=8)(torch.randn(2, 3, 10))
    with pytest.raises(ValueError, match=r"decode_bits expects 8 bits .* got shape \(4, 7\)"):
        ours.decode_bits(torch.ones(4, 7))
    with pytest.raises(ValueError, match=r"pop_size \(4\) must be greater than elitism_count \(4\)"):
        EvoLFQ(nn.Identity(), nn.Identity(), dim=4, pop_size=4, elitism_count=4)
    with pytest.raises(ValueError, match=r"give an lfq module, or dim / codebook_size"):
        EvoLFQ(nn.Identity(), nn.Identity())
    with pytest.raises(ValueError, match=r"evolve needs shape"):
        next(ours.evolve(lambda d, b: d.sum(-1)))
    with pytest.raises(ValueError, match=r"needs at least one sample"):
        ours.init_population_from_data(torch.randn(0, 3, 10))
    with pytest.raises(ValueError, match=r"LFQ: orthogonal_rotation=True is not supported"):
        EvoLFQ(nn.Identity(), nn.Identity(), dim=4, orthogonal_rotation=True)


def test_compiled_training_and_step_match_eager():
    """torch.compile(fullgraph=True): a training step (forward + backward, dropout drawn by Inductor's
    fallback_random as eager) and a genetic step (decode, fitness, selection, crossover, mutation) match eager; no
    graph break, so neither reads anything back to the host."""
    make, kw, _ = CASES["projections-2-codebooks-commit"]
    with torch._inductor.config.patch(fallback_random=True):
        assert_compiled_training_matches_eager(lambda: EvoLFQ(*make(), **kw),
                                               [torch.randn(2, 7, 10, generator=gen(s)) for s in range(3)],
                                               atol=1e-4, rtol=1e-4)
        torch._dynamo.reset()
        _, ours = _pair("projections-2-codebooks-commit", pop_size=10, elitism_count=2)
        score = _fitness_to(torch.randn(10, generator=gen(16)))
        pop = ours.init_random_population(shape=(3, ours.num_bits))
        torch.manual_seed(6)
        want = ours.step(pop, score, batch_size=4)
        torch.manual_seed(6)
        have = torch.compile(ours.step, fullgraph=True)(pop, score, batch_size=4)
    assert torch.equal(have[0], want[0])
    torch.testing.assert_close(have[1], want[1])
    torch._dynamo.reset()
