"""Random projections P (D × d) for subspace training, applied as matrix-free products P·x and Pᵀ·g.

    dense     P = N / ‖N‖_col, N ~ Gaussian (D, d)           Li et al. 2018; kept in memory: small D·d only
    fastfood  P = s · [V_1; V_2; ...; V_C][:D, :d]           Le, Sarlós & Smola 2013, as used by
              V_c = H G_c Π H B_c   (L × L, L = 2^⌈log2 d⌉)   Aghajanyan et al. 2021 for billions of weights

    B_c  random ±1 signs (diagonal)          H  Walsh-Hadamard matrix (entries ±1), never materialised:
    Π    a random permutation                   H_L x = vec(H_a X H_b), X = x as (a, b), L = a·b
    G_c  Gaussian scales (diagonal), folded with the normalisation 1/sqrt(L·ΣG_c²) that gives every
         column of V_c unit norm; s = sqrt(L / D) gives every column of P norm ~1 over the C = ⌈D/L⌉ blocks

Each column j of V_c has ‖V_c e_j‖² = L·ΣG_c² exactly (H B_c e_j is a ±1 vector, Π keeps it, G_c scales
it, H multiplies norms by sqrt(L)); columns of different blocks see independent signs, so PᵀP ≈ I
(orthogonal-ish, off-diagonal ~ 1/sqrt(D)). Memory: 1 byte (sign) + 4 bytes (scale) per row of P and one
permutation of L indices shared by the blocks, instead of 4·d bytes per row for a dense P. Time per
product: O(D log L), in chunks of blocks so no temporary is larger than `CHUNK` elements.

Both are generated from a seed on the CPU generator, so the same (seed, D, d) gives the same P anywhere:
a delta stores the seed and d, never P.
"""

from __future__ import annotations

import math

import torch
from torch import nn

CHUNK = 1 << 22
"""Elements of P processed at once by the Fastfood products (bounds the temporaries to ~16 MB each)."""
KINDS = ("auto", "dense", "fastfood")
DENSE_LIMIT = 1 << 24
"""auto picks a dense P when D·d is at most this many elements (64 MB in fp32), Fastfood above."""


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The n × n Sylvester Walsh-Hadamard matrix (entries ±1, n a power of 2): H_2n = [[H, H], [H, -H]]."""
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_rows(x: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """H_L applied to each row of x (rows, L), unnormalised, via H_L = H_a ⊗ H_b: two small matmuls."""
    h_a, h_b = factors
    rows = x.shape[0]
    y = x.reshape(rows, h_a.shape[0], h_b.shape[0]) @ h_b  # (rows, a, b): mixes the last axis
    return torch.matmul(h_a, y).reshape(rows, -1)  # (rows, L): mixes the middle axis


class Projection(nn.Module):
    """P (D × d) as an operator: forward(x (d,)) -> P·x (D,), differentiable in x."""

    def __init__(self, full_dim: int, dim: int):
        super().__init__()
        self.full_dim, self.dim = full_dim, dim

    def matvec(self, x: torch.Tensor) -> torch.Tensor:  # (d,) -> (D,)
        raise NotImplementedError

    def rmatvec(self, g: torch.Tensor) -> torch.Tensor:  # (D,) -> (d,)
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ProjectionProduct.apply(x, self)

    def matrix(self) -> torch.Tensor:
        """P itself (D, d), column by column: for tests and small D only."""
        eye = torch.eye(self.dim, device=self.device_of())
        return torch.stack([self.matvec(eye[j]) for j in range(self.dim)], dim=1)

    def device_of(self) -> torch.device:
        return next(self.buffers()).device


class _ProjectionProduct(torch.autograd.Function):
    """y = P·x with the gradient Pᵀ·g computed by the projection itself (nothing of size D is saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, projection: Projection) -> torch.Tensor:
        ctx.projection = projection
        with torch.no_grad():
            return projection.matvec(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        with torch.no_grad():
            return ctx.projection.rmatvec(g), None


class DenseProjection(Projection):
    """Gaussian P with unit-norm columns (Li et al. 2018), materialised: for small models and tests."""

    def __init__(self, full_dim: int, dim: int, seed: int, device: torch.device | str = "cpu"):
        super().__init__(full_dim, dim)
        generator = torch.Generator().manual_seed(seed)
        matrix = torch.randn(full_dim, dim, generator=generator)  # (D, d)
        matrix /= matrix.norm(dim=0, keepdim=True).clamp_min(1e-12)
        self.register_buffer("weight", matrix.to(device), persistent=False)

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight @ x.to(self.weight.dtype)  # (D, d) @ (d,) -> (D,)

    def rmatvec(self, g: torch.Tensor) -> torch.Tensor:
        return g.to(self.weight.dtype) @ self.weight  # (D,) @ (D, d) -> (d,)


class FastfoodProjection(Projection):
    """Stacked Fastfood blocks H G Π H B (Le et al. 2013), rows cut to D; see the module docstring."""

    def __init__(self, full_dim: int, dim: int, seed: int, device: torch.device | str = "cpu"):
        super().__init__(full_dim, dim)
        self.block = 1 << max(0, math.ceil(math.log2(dim)))  # L
        self.blocks = -(-full_dim // self.block)  # C
        generator = torch.Generator().manual_seed(seed)
        shape = (self.blocks, self.block)
        signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8) * 2 - 1  # B_c
        perm = torch.randperm(self.block, generator=generator)  # Π, shared by the blocks
        gauss = torch.randn(shape, generator=generator)  # G_c
        gauss /= (self.block * gauss.pow(2).sum(1, keepdim=True)).sqrt()  # unit-norm columns per block
        gauss *= math.sqrt(self.block / full_dim)  # unit-norm columns of P over ~D/L blocks
        self.register_buffer("signs", signs.to(device), persistent=False)
        self.register_buffer("gauss", gauss.to(device), persistent=False)
        self.register_buffer("perm", perm.to(device), persistent=False)
        self.register_buffer("inverse_perm", torch.argsort(perm).to(device), persistent=False)
        log = int(math.log2(self.block))
        a = 1 << (log // 2)
        self._factors = (hadamard_matrix(a, device=device), hadamard_matrix(self.block // a, device=device))

    def _apply(self, fn, recurse=True):  # .to(device) moves the Hadamard factors with the buffers
        result = super()._apply(fn, recurse)
        self._factors = tuple(fn(h) for h in self._factors)
        return result

    def _chunks(self):
        step = max(1, CHUNK // self.block)
        for start in range(0, self.blocks, step):
            yield start, min(self.blocks, start + step)

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        padded = x.new_zeros(self.block, dtype=self.gauss.dtype)
        padded[:self.dim] = x  # (L,)
        out = x.new_empty(self.blocks * self.block, dtype=self.gauss.dtype)
        for start, end in self._chunks():
            u = self.signs[start:end] * padded  # (c, L): B_c x
            u = hadamard_rows(u, self._factors)  # H B_c x
            u = u.index_select(1, self.perm) * self.gauss[start:end]  # G_c Π H B_c x
            out[start * self.block:end * self.block] = hadamard_rows(u, self._factors).reshape(-1)
        return out[:self.full_dim]

    def rmatvec(self, g: torch.Tensor) -> torch.Tensor:
        padded = g.new_zeros(self.blocks * self.block, dtype=self.gauss.dtype)
        padded[:self.full_dim] = g
        padded = padded.view(self.blocks, self.block)  # (C, L)
        total = padded.new_zeros(self.block)
        for start, end in self._chunks():  # Vᵀ = B H Πᵀ G H, summed over the blocks
            u = hadamard_rows(padded[start:end], self._factors) * self.gauss[start:end]
            u = hadamard_rows(u.index_select(1, self.inverse_perm), self._factors)
            total += (u * self.signs[start:end]).sum(0)
        return total[:self.dim]

    def dense_reference(self) -> torch.Tensor:
        """P built from explicit H, Π, G_c, B_c matrices (D, d): the test reference for small D."""
        h = hadamard_matrix(self.block, device=self.gauss.device)
        pi = torch.eye(self.block, device=h.device)[self.perm]  # (Π u)[k] = u[perm[k]]
        blocks = [h @ torch.diag(self.gauss[c]) @ pi @ h @ torch.diag(self.signs[c].float())
                  for c in range(self.blocks)]
        return torch.cat(blocks, 0)[:self.full_dim, :self.dim]


def make_projection(kind: str, full_dim: int, dim: int, seed: int,
                    device: torch.device | str = "cpu") -> Projection:
    """A dense or Fastfood P (auto: dense while D·d <= DENSE_LIMIT)."""
    if kind == "auto":
        kind = "dense" if full_dim * dim <= DENSE_LIMIT else "fastfood"
    cls = DenseProjection if kind == "dense" else FastfoodProjection
    return cls(full_dim, dim, seed, device)
