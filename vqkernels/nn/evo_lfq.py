"""``EvoLFQ``: an encoder, :class:`vqkernels.nn.LFQ` and a decoder, with a genetic algorithm that searches the
decoder's binary latent space; a drop-in for vector-quantize-pytorch's (1.32.0, evo_lookup_free_quantization.py).

The quantisation is :class:`~vqkernels.nn.lfq.LFQ`'s (:func:`vqkernels.lfq_quantize`, :func:`vqkernels.lfq_entropy`);
the genetic operators (random populations, mutation, uniform crossover, tournament selection, elitism) have no
op: they are plain torch here, issuing theirs' generator calls in theirs' order."""

from collections import namedtuple
from contextlib import contextmanager

import torch
from torch import nn

from .lfq import LFQ

Return = namedtuple("Return", ["reconstructed", "indices", "entropy_aux_loss"])
Result = namedtuple("Result", ["pop_bits", "best_gene", "best_fitness", "best_decoded"])


@contextmanager
def _eval_mode(module):
    """``module`` (and every submodule) in eval mode, then all back to ``module``'s mode (as torch_einops_utils'
    temp_eval, which theirs uses)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class EvoLFQ(nn.Module):
    """``encoder`` -> LFQ -> ``decoder``, with an evolutionary search over the LFQ bits.

    ``forward(x, **lfq_kwargs)`` returns ``Return(reconstructed, indices, entropy_aux_loss)``: the decoder's output
    of the LFQ codes of ``encoder(x)`` (a [b, d] latent is one token per sample), the LFQ indices and its aux loss.
    ``encode(x)`` gives the bits (0/1, or -1/+1 with ``return_signs``) of the codes in eval mode, ``decode_bits``
    the decoder's output of bits [..., codebook_dim * num_codebooks] (0/1 or -1/+1). The genetic algorithm works on
    populations of such bits [pop, ..., codebook_dim * num_codebooks]: ``init_random_population``,
    ``init_population_from_data``, ``mutate``, ``uniform_crossover``, ``tournament_selection``; ``step`` scores a
    population with ``fitness_fn(decoded, pop_bits)`` (higher is better), keeps the ``elitism_count`` best and
    breeds the rest (two tournaments, uniform crossover, mutation); ``evolve`` yields
    ``Result(pop_bits, best_gene, best_fitness, best_decoded)`` after each of ``generations`` steps.

    ``lfq`` (any module with LFQ's interface), or ``dim`` / ``codebook_size`` / ``num_codebooks`` and the other
    keywords of :class:`~vqkernels.nn.lfq.LFQ` to build one; the ``state_dict`` keys are theirs (``encoder.*``,
    ``decoder.*``, ``lfq.*``), so their checkpoints load. Same generator seed, same populations as theirs.

    Differences: ``evolve``'s ``best_gene`` is the gene that scored ``best_fitness`` (theirs picks the index of the
    best score in the next generation, a different gene unless it is an elite at that index); with LFQ
    projections ``encode`` gives the bits of the codes themselves ([..., codebook_dim * num_codebooks], what
    ``decode_bits`` reads), theirs the signs of the projected-out output (which ``decode_bits`` cannot read back;
    without projections both are the same); a token whose latent holds a NaN (LFQ index -1) encodes as all ones
    (theirs: the signs of its other entries, 0 for the NaN). ``decode_bits`` refuses another number of bits with a
    clear error.
    ``evolve`` reads each generation's best fitness back to the host (it yields it as a Python float, as theirs);
    ``forward`` and ``step`` read nothing back.
    """

    def __init__(self, encoder, decoder, lfq=None, *, dim=None, codebook_size=None, num_codebooks=1, pop_size=64,
                 mutation_rate=0.02, tournament_size=2, elitism_count=1, generations=50, **lfq_kwargs):
        super().__init__()
        if pop_size <= elitism_count:
            raise ValueError(f"vqkernels.nn.EvoLFQ: pop_size ({pop_size}) must be greater than elitism_count "
                             f"({elitism_count})")
        if lfq is None:
            if dim is None and codebook_size is None:
                raise ValueError("vqkernels.nn.EvoLFQ: give an lfq module, or dim / codebook_size to build one")
            lfq = LFQ(dim=dim, codebook_size=codebook_size, num_codebooks=num_codebooks, **lfq_kwargs)
        self.encoder = encoder
        self.decoder = decoder
        self.lfq = lfq
        self.pop_size = pop_size
        self.mutation_rate = mutation_rate
        self.tournament_size = tournament_size
        self.elitism_count = elitism_count
        self.generations = generations
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    @property
    def device(self):
        return self.zero.device

    @property
    def num_bits(self):
        """Bits per gene token: codebook_dim * num_codebooks."""
        return self.lfq.codebook_dim * self.lfq.num_codebooks

    def _lfq(self, x, **kwargs):
        """``(one_token, LFQ results)`` of ``encoder(x)``, a [b, d] latent taken as one token per sample ([b, 1, d])."""
        latents = self.encoder(x)
        one_token = latents.ndim == 2
        return one_token, self.lfq(latents.unsqueeze(1) if one_token else latents, **kwargs)

    def forward(self, x, **kwargs):
        one_token, (quantized, indices, aux_loss) = self._lfq(x, **kwargs)
        if one_token:
            quantized, indices = quantized.squeeze(1), indices.squeeze(1)
        return Return(self.decoder(quantized), indices, aux_loss)

    @torch.no_grad()
    def encode(self, x, return_signs=False):
        """The code bits of ``encoder(x)`` in eval mode: 0/1 floats, or -1/+1 with ``return_signs``, in the LFQ
        output's layout before its projection ([b, ..., codebook_dim * num_codebooks], channel-first as LFQ)."""
        with _eval_mode(self):
            one_token, (_, indices, _) = self._lfq(x)
            codes = self.lfq.indices_to_codes(indices, project_out=False)
        positive = (codes.squeeze(1) if one_token else codes) > 0
        return torch.where(positive, 1.0, -1.0) if return_signs else positive.float()

    @torch.no_grad()
    def decode_bits(self, bits):
        """The decoder's output (eval mode) of bits [..., codebook_dim * num_codebooks], 1 where > 0."""
        if bits.ndim == 0 or bits.shape[-1] != self.num_bits:
            raise ValueError(f"vqkernels.nn.EvoLFQ: decode_bits expects {self.num_bits} bits (codebook_dim "
                             f"{self.lfq.codebook_dim} x {self.lfq.num_codebooks} codebooks) in the last dimension, "
                             f"got shape {tuple(bits.shape)}")
        with _eval_mode(self):
            lead = bits.shape[:-1]
            on = (bits > 0).reshape(-1, self.lfq.num_codebooks, self.lfq.codebook_dim)
            indices = (on.long() * self.lfq.mask).sum(dim=-1)
            if not self.lfq.keep_num_codebooks_dim:
                indices = indices.squeeze(-1)
            codes = self.lfq.indices_to_codes(indices)
            return self.decoder(codes.reshape(*lead, codes.shape[-1]))

    # genetic algorithm

    def init_random_population(self, pop_size=None, shape=None, device=None, is_sign=False):
        """Uniformly random genes [pop_size, *shape]: 0/1 floats, or -1/+1 with ``is_sign``."""
        pop_size = self.pop_size if pop_size is None else pop_size
        device = self.device if device is None else device
        genes = torch.randint(0, 2, (pop_size, *shape), device=device).float()
        return torch.where(genes > 0, 1.0, -1.0) if is_sign else genes

    def init_population_from_data(self, x, pop_size=None, mutation_rate=None, is_sign=False):
        """``encode(x)``'s genes, cycled (or cut) to ``pop_size``, then mutated."""
        pop_size = self.pop_size if pop_size is None else pop_size
        mutation_rate = self.mutation_rate if mutation_rate is None else mutation_rate
        genes = self.encode(x, return_signs=is_sign)
        if genes.shape[0] == 0:
            raise ValueError("vqkernels.nn.EvoLFQ: init_population_from_data needs at least one sample")
        genes = genes[torch.arange(pop_size, device=genes.device) % genes.shape[0]]
        return self.mutate(genes, mutation_rate=mutation_rate, is_sign=is_sign) if mutation_rate > 0 else genes

    def uniform_crossover(self, parent1, parent2):
        """Each bit from ``parent1`` or ``parent2`` with probability 1/2."""
        take_first = torch.rand_like(parent1.float()) < 0.5
        return torch.where(take_first, parent1, parent2)

    def mutate(self, population, mutation_rate=None, is_sign=False):
        """Flips each bit with probability ``mutation_rate``."""
        mutation_rate = self.mutation_rate if mutation_rate is None else mutation_rate
        flip = torch.rand_like(population.float()) < mutation_rate
        return torch.where(flip, -population if is_sign else 1.0 - population, population)

    def _tournament_winners(self, fitnesses, shape, tournament_size):
        """Indices [*shape] of the fittest of ``tournament_size`` uniformly drawn contenders, for each of
        ``shape`` tournaments (the first contender on ties)."""
        contenders = torch.randint(0, fitnesses.shape[0], (*shape, tournament_size), device=self.device)
        return contenders.gather(-1, fitnesses[contenders].argmax(dim=-1, keepdim=True)).squeeze(-1)

    def tournament_selection(self, population, fitnesses, tournament_size=None):
        """``len(population)`` tournament winners."""
        tournament_size = self.tournament_size if tournament_size is None else tournament_size
        return population[self._tournament_winners(fitnesses, (population.shape[0],), tournament_size)]

    @torch.no_grad()
    def step(self, pop_bits, fitness_fn, tournament_size=None, mutation_rate=None, elitism_count=None,
             is_sign=False, batch_size=None, **kwargs):
        """One generation: ``(next population, the fitnesses of pop_bits)``. ``batch_size`` decodes the population
        in chunks of that many genes; other keywords are ignored (as theirs)."""
        tournament_size = self.tournament_size if tournament_size is None else tournament_size
        mutation_rate = self.mutation_rate if mutation_rate is None else mutation_rate
        elitism_count = self.elitism_count if elitism_count is None else elitism_count
        pop_size = pop_bits.shape[0]

        if batch_size is None:
            decoded = self.decode_bits(pop_bits)
        else:
            decoded = torch.cat([self.decode_bits(chunk) for chunk in pop_bits.split(batch_size)])
        fitnesses = fitness_fn(decoded, pop_bits)
        if not torch.is_tensor(fitnesses):
            fitnesses = torch.tensor(fitnesses, device=self.device, dtype=torch.float32)

        elites = pop_bits[torch.argsort(fitnesses, descending=True)[:elitism_count]]
        parents = pop_bits[self._tournament_winners(fitnesses, (pop_size - elitism_count, 2), tournament_size)]
        offspring = self.uniform_crossover(parents[:, 0], parents[:, 1])
        offspring = self.mutate(offspring, mutation_rate=mutation_rate, is_sign=is_sign)
        return torch.cat([elites, offspring]), fitnesses

    @torch.no_grad()
    def evolve(self, fitness_fn, pop_bits=None, pop_size=None, shape=None, generations=None, is_sign=False,
               return_best_decoded=False, **step_kwargs):
        """Yields ``Result(pop_bits, best_gene, best_fitness, best_decoded)`` after each generation: the new
        population, the best gene scored so far and its fitness (a float), and with ``return_best_decoded`` that
        gene's decoder output. Starts from ``pop_bits`` or a random population of ``shape`` genes."""
        generations = self.generations if generations is None else generations
        if pop_bits is None:
            if shape is None:
                raise ValueError("vqkernels.nn.EvoLFQ: evolve needs shape when pop_bits is not given")
            pop_bits = self.init_random_population(pop_size, shape, is_sign=is_sign)

        best_fitness, best_gene, best_decoded = float("-inf"), None, None
        for _ in range(generations):
            scored = pop_bits
            pop_bits, fitnesses = self.step(scored, fitness_fn, is_sign=is_sign, **step_kwargs)
            top = torch.argmax(fitnesses)
            top_fitness = fitnesses[top].item()  # the host decides whether the best gene changes
            if top_fitness > best_fitness:
                best_fitness, best_gene = top_fitness, scored[top].clone()
            if return_best_decoded and best_gene is not None:
                best_decoded = self.decode_bits(best_gene.unsqueeze(0)).squeeze(0)
            yield Result(pop_bits, best_gene, best_fitness, best_decoded)
