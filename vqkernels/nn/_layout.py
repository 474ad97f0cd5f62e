"""Input layouts of the quantizer layers: tokens [B, N, D] (channel-last), [B, D, N]
(``channel_last=False``), image feature maps [B, C, H, W] (``accept_image_fmap``), video feature
maps [B, C, T, H, W] (``accept_3d_fmap``), or a single token per sample [B, D]. Everything is
quantized as rows of a [B, N, D] view."""


class Layout:
    """Moves an input to tokens [B, N, D] and results back to the input's layout."""

    def __init__(self, owner, x, dim, accept_image_fmap=False, channel_last=True, accept_3d_fmap=False):
        self.image = accept_image_fmap or accept_3d_fmap
        self.only_one = not self.image and x.dim() == 2
        self.transposed = not self.image and not channel_last and not self.only_one
        if self.image:
            rank, option = (5, "accept_3d_fmap expects [B, C, T, H, W]") if accept_3d_fmap else \
                (4, "accept_image_fmap expects [B, C, H, W]")
            if x.dim() != rank:
                raise ValueError(f"{owner}: {option} inputs, got shape {tuple(x.shape)}")
            self.hw = tuple(x.shape[2:])
        elif not self.only_one and x.dim() != 3:
            raise ValueError(f"{owner}: expects [B, N, D] (or [B, D, N] with channel_last=False, or [B, D]) inputs, "
                             f"got shape {tuple(x.shape)}")
        features = x.shape[1] if self.image or self.transposed else x.shape[-1]
        if features != dim:
            raise ValueError(f"{owner}: expects {dim} features (dim={dim}), got input shape {tuple(x.shape)}")

    def tokens(self, x):
        if self.image:
            return x.flatten(2).transpose(1, 2)
        if self.only_one:
            return x.unsqueeze(1)
        return x.transpose(1, 2) if self.transposed else x

    def restore(self, t):
        """[B, N, ..., D] -> the input's layout; extra dimensions (e.g. top-k's k) follow the token ones."""
        if self.image:
            return t.movedim(-1, 1).reshape(t.shape[0], t.shape[-1], *self.hw, *t.shape[2:-1])
        if self.only_one:
            return t.squeeze(1)
        return t.movedim(-1, 1) if self.transposed else t

    def indices(self, idx):
        """[B, N, ...] -> [B, H, W, ...] for images ([B, T, H, W, ...] for videos), [B, ...] for single tokens."""
        if self.image:
            return idx.reshape(idx.shape[0], *self.hw, *idx.shape[2:])
        if self.only_one:
            return idx.squeeze(1)
        return idx


class ChannelFirst:
    """Channel-first inputs of any rank ([b, d, ...], e.g. images and videos) as tokens
    [b, n, d] and results back; a no-op when ``channel_first`` is false."""

    def __init__(self, x, channel_first):
        self.on = channel_first
        self.spatial = x.movedim(1, -1).shape[:-1] if channel_first else None

    def tokens(self, x):
        return x.movedim(1, -1).reshape(x.shape[0], -1, x.shape[1]) if self.on else x

    def restore(self, t):
        """[b, n, d'] -> [b, d', ...]."""
        return t.reshape(*self.spatial, t.shape[-1]).movedim(-1, 1) if self.on else t

    def indices(self, idx):
        """[b, n, c] -> [b, ..., c]."""
        return idx.reshape(*self.spatial, idx.shape[-1]) if self.on else idx
