r"""CoSOAdamW: GaLore-style AdamW whose updates stay orthogonal to what earlier tasks need.

Continual fine-tuning: a model learns tasks one after another and should not forget the
earlier ones. Two published rules, combined on one piece of machinery:

- CoSO (Cheng et al. 2025, "Continuous Subspace Optimization for Continual Learning"):
  within a task, optimize in a series of low-rank subspaces taken from the SVD of the
  gradients (GaLore's), each orthogonal to a *historical* subspace of the earlier tasks;
  keep a sketch of the current task's projected gradients (theirs: Frequent Directions;
  here a Gaussian accumulator truncated into it, below) and, when the task ends, fold its
  dominant directions into the history.
- Sculpting Subspaces / OSFT (Nayak et al. 2025): protect the high-singular-value subspace
  of each weight matrix (its "critical" directions) and update only in its orthogonal
  complement.

The rule (per matrix W of m×n; per param group, every symbol a hyperparameter below)
-------------------------------------------------------------------------------------

The protected side is ``side``: "right" (default) is the row space of W, ℝⁿ — for a torch
``Linear`` weight (out, in) the space of its *inputs*, so ΔW·x = 0 for every input x in the
protected subspace: the layer's response to inputs the earlier tasks used is untouched —
and "left" is the column space, ℝᵐ. Write d for that side's dimension and, for any m×n X,

.. math::
    \Pi(X) = X - X H H^\top \ (\text{right}), \qquad \Pi(X) = X - H H^\top X \ (\text{left})

with H (d×c) the protected basis: orthonormal columns, c ≤ h_max = ``max_history`` (a
fraction of min(m, n), or an int). It is stored as the first c columns of a d×h_max
``history``, whose other h_max − c columns hold the current task's sketch S (below): the
sketch needs no memory of its own beyond its accumulator. Π multiplies by the c columns
only, so it costs O(m·n·c): nothing while the history is empty.

**Each step** (t counted from 0 over the whole run; GaLore's math, see
:class:`~matrixopt.GaLoreAdamW`, on Π(G) instead of G):

.. math::
    \tilde G &= \Pi(G) \\
    P &\leftarrow \mathrm{top}_r\,\mathrm{SVD}(\tilde G) \quad \text{if } t \bmod T = 0 \\
    L &= \mathrm{project}_P(\tilde G), \quad M, V \leftarrow \text{Adam moments of } L \\
    \Delta &= \Pi\Big(\mathrm{project\_back}_P\big(\tfrac{\sqrt{1-\beta_2^{t+1}}}{1-\beta_1^{t+1}}
             \tfrac{M}{\sqrt V + \epsilon}\big)\Big) \\
    W &\leftarrow W - \eta\lambda\,\Pi(W) - \eta\, s\,\Delta

so every change of W, weight decay included, lies in the complement of H: Hᵀ·ΔW = 0
(left) or ΔW·H = 0 (right), to the rounding of the work dtype (fp32). The outer Π is needed
even though P is taken from Π(G): Adam's element-wise division, a refresh's warm start and
a history that grew at ``end_task`` would all leak into H otherwise.

With ``protect`` = "gradients" or "both" each step also sketches the gradient outside the
history, G̃ = Π(G), seen from the protected side (Y = G̃ᵀ, d×k with d = n, k = m, for
"right"; Y = G̃ for "left"), into an accumulator A (d×b, b = ``sketch_rank``, default r),
and every j = ``sketch_gap`` steps (after the steps t with (t + 1) mod j = 0) takes A into
the task's sketch S (d×ℓ, ℓ = h_max − c: as many directions as the history can still take),
cut to its top ℓ directions, with ε (a scalar per matrix) the energy cut off so far:

.. math::
    A &\leftarrow A + Y\,\Omega_t/\sqrt{b}, \qquad \Omega_t \in \mathbb{R}^{k\times b}
        \text{ i.i.d. } \mathcal{N}(0, 1) \\
    [S, A] &= Z, \quad Z Z^\top = Q\,\mathrm{diag}(\lambda_1 \ge \lambda_2 \ge \dots)\,Q^\top: \quad
    S \leftarrow Q_{:, :\ell}\,\mathrm{diag}(\sqrt{\lambda_i})_{i \le \ell}, \quad
    \varepsilon \leftarrow \varepsilon + \textstyle\sum_{i > \ell} \lambda_i, \quad A \leftarrow 0

Ω_t is drawn in fp32 by a ``torch.Generator`` seeded with numpy's
``SeedSequence(seed, spawn_key=(group, place, matrix, t, 1))``'s first word
(:func:`~matrixopt.seeding.sketch_seeds`, stream 1), independently per step, so
E[Ω_t Ω_tᵀ]/b = I and E[A Aᵀ] = Σ_t Y_t Y_tᵀ over the steps since A was last taken in: A
is a b-column Gaussian sketch of those gradients. S Sᵀ + A Aᵀ tracks the top of the task's
gradient covariance on the protected side, and ε + ‖S‖²_F + ‖A‖²_F (in expectation) its
trace, the task's whole energy there. Cost per step: the product Y·Ω (2·d·k·b flops,
GaLore's projection's for b = r), Π(G) once more for it (O(m·n·c): the projection's is not
kept) and, every j steps, one eigendecomposition of the smaller
Gram matrix of Z (d×d or (ℓ+b)×(ℓ+b)); no memory for S, which lives in the history's free
columns.

What the history must hold is the old task's *input* space (gradient projection memory's
argument: ΔW·x = 0 for the inputs x the task saw keeps the layer's outputs on it), and a
Linear's gradient G = Σ δ xᵀ has its rows in the span of those inputs, so G̃ is sketched
rather than GaLore's rank-r projection of it: that one holds only the input directions of
the current rank-r subspace (for a right-side GaLore projector, r of the n), and a history
folded from it left most of the task's inputs unprotected (measured: see
``benchmarks.continual``).

**Folding** a matrix X (d×k) into H with energy threshold e and energy ε outside X: X̃ =
X − H Hᵀ X with SVD X̃ = U Σ Vᵀ; the k′ = min{j : Σ_{i≤j} σᵢ² ≥ e·(Σᵢ σᵢ² + ε)} leading
columns of U (at most all of them; directions of
σ ≤ 1e-6·σ₁ are never added: they carry no energy) go into the next free columns of H
(re-orthogonalized against H once more, then QR), c ← c + k′. When k′ exceeds the free
columns h_max − c, only the top h_max − c directions by energy are added and the history is
*full*: nothing is added to it again, and the params concerned are named in one warning.

- ``protect="gradients"`` (CoSO): :meth:`CoSOAdamW.end_task` folds X = [S, A] (d×(ℓ+b))
  with the sketch's ε and e = ``history_energy``, and resets S, A and ε to zero. The first
  task runs as GaLore.
- ``protect="weights"`` (Sculpting Subspaces): at the start of each task — a param's first
  step, and every ``end_task`` — W itself is folded (X = W from the protected side, ε = 0)
  with e = ``weight_energy``: the top singular subspace of W outside H.
- ``protect="both"``: at ``end_task``, S first, then W; at the first step, W.

The sketch's width ℓ is the history's free capacity h_max − c, the most directions a fold
can add, and ε keeps what its truncations cut off, so e is taken against the task's whole
energy: a sketch that only drops its tail (Frequent Directions' shrink, which also
subtracts λ_{ℓ+1} from every direction it keeps) reports a task's energy as more
concentrated than it is, and e then folds fewer directions than the task used (measured on
``python -m benchmarks continual --quick`` with both at lr 0.01, seed 1: 0.60× AdamW's
forgetting with that shrink, 0.47× with the truncation and ε). The accumulator's b columns
bound how many directions of the j steps between truncations reach S; there (T = 25, every
optimizer at lr 0.01, AdamW included) (b, j) = (r, 5) gave 0.49× / 0.47× / 0.44× on seeds
0 / 1 / 2, (r, 10) 0.47× / 0.67× / 0.47×, (r/2, 5) 0.57× on seed 1, and the sketch's own
seed moves these by ~0.05-0.09. ``max_history`` defaults to 1.0, min(m, n) directions: a
memory bound (d·min(m, n) floats, at most one fp32 copy of W), not a forgetting rule — e
decides how many directions a task keeps. It binds where d > min(m, n) (a right-side
history of a wide matrix, a left-side one of a table), and then warns.

e trades forgetting for the next task's room: a larger e protects more of a task and leaves
fewer directions to learn the next in. Its default, 0.95, is the largest e whose median
new-task loss stays within 5% of AdamW's on ``python -m benchmarks.continual --quick`` (six
pairs of byte-level corpora, prose ↔ code, prose ↔ verse, code ↔ structured text, three
seeds, 150 steps a task) with CoSO at its own best lr and at AdamW's: e = 0.9 / 0.95 / 0.97
forgot 0.90× / 0.77× / 0.63× AdamW's there (medians; at AdamW's lr 0.72× / 0.53× / 0.48×)
for a new-task loss +0.7% / +1.4% / +3.4% (+3.2% / +4.7% / +6.9%).

**The fallback params** (norms' gains, biases, a table left on the fallback) are protected
by the same rule, for the maps they are. Such a param acts entry-wise: a gain g gives
yᵢ = gᵢ x̂ᵢ, a bias b gives yᵢ = xᵢ + bᵢ·1, an embedding E gives E[token] — each entry is a
map whose input is one coordinate of x̂, the constant 1, or the one-hot token. Its input
space in an earlier task is the set of entries that task used, and an update orthogonal to
it (the rule's Hᵀ-side condition, with H the used coordinates) leaves those entries
unchanged. So, with ``protect_fallback`` (default True), the fallback's rule (AdamW) runs as
usual and then

.. math::
    \theta_i \leftarrow \theta_i^{\text{before}} \quad \text{for every } i \text{ with } \Omega_i = 1,
    \qquad \Omega \leftarrow \Omega \lor T \text{ at } \texttt{end\_task}, \quad
    T \leftarrow T \lor (G \ne 0) \text{ each step}

with T (``touched``) the entries the current task gave a nonzero gradient and Ω
(``protected``) those of the earlier tasks: gains and biases are learned on the first task
and kept after it (as gradient projection memory does for batch norm), an embedding on the
fallback keeps the rows of tokens the earlier tasks saw and learns the new ones. Without it
a gain or a norm upstream of a protected matrix moves that matrix's inputs on the old tasks
and the orthogonality of ΔW no longer keeps its outputs. A table meant to keep learning
belongs on the matrix rule (it is then protected by subspace, ``side="left"`` for an
embedding: its rows are its inputs). The moments of protected entries still follow their
gradients; only the param is held.

The protected history is optimizer state (``history`` (B, d, h_max): H, then the sketch S;
``history_count`` (B,), c; and with a sketch its accumulator ``sketch`` (B, d, b) and
``sketch_energy`` (B,), ε; whole per matrix, at least fp32; for a
fallback param the bool masks ``protected`` and ``touched``, shaped like it), saved and
loaded with the state dict (fixed shapes, so the load-time shape check and
``torch.distributed.checkpoint`` keep working), counted by ``state_bytes()``, bounded by
``max_history``.

Distribution: the refresh (SVD of Π(G)), the sketch's updates and every fold take whole
matrices and run through the bucket's ``matrix_map``, so FSDP2 and DDP
(``distributed="replicated"``) reproduce the single-process run; ``end_task()`` must be
called on every rank. A right-side Π is row-local (each rank projects its own rows); a
left-side one sums over rows, so with ``side="left"`` the projections run on the owner of
the whole matrix, as GaLore's left projection does.
"""
import functools

import torch

from matrixopt.kernels import host

from .fallback import AdamW
from .galore import GaLoreAdamW, svd_projector
from .lowrank import LowRankAdamW, back_projections
from .matrices import local_matrices, resolve_rank
from .ops import Out, Rows, Whole, named_map
from .projectors import whole_low
from .report import warn_once
from .seeding import bucket_seeds
from .state import AT_LEAST_FP32, State
from .validation import choice, integer, rank_spec, real
from .weights import DEFAULT_MASTER_WEIGHTS

PROTECT = ("gradients", "weights", "both")
#: The sketch's Gaussian draws: their own stream of :func:`~matrixopt.seeding.sketch_seeds`.
SKETCH_STREAM = 1
#: Directions whose singular value is below this fraction of the largest are never folded.
NEGLIGIBLE = 1e-6


def split_history(H: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The histories H (B, d, h) split at ``count`` (B,): (protected bases, sketches), each
    zero where the other is."""
    beyond = (torch.arange(H.shape[-1], device=H.device) >= count[:, None])[:, None, :]
    return H.masked_fill(beyond, 0), H.masked_fill(~beyond, 0)


def protected(H: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The protected bases of the histories H (B, d, h_max): their first max(count) columns,
    each matrix's beyond its own count zeroed (there H holds the task's sketch)."""
    columns = host.read(count, lambda count: int(count.max()) if count.numel() else 0, 0)   # fake: a first task's
    return split_history(H[..., :columns], count)[0]


def complement(X: torch.Tensor, H: torch.Tensor, side: str, passes: int = 2) -> torch.Tensor:
    """Π(X): the stack X (B, m, n) with its component in the span of H (B, d, c) removed on
    ``side`` ("left": X − H HᵀX; "right": X − X H Hᵀ): O(m·n·c), nothing for c = 0. Zero
    columns of H remove nothing.

    ``passes=2`` (Gram–Schmidt's "twice is enough") for what is added to W: once, the
    rounding leaves ~1e-7 of X's part inside H, which is large against Π(X) when X lies
    mostly in H (as Adam's step does after a task boundary); twice, the leak is ~1e-7 of
    Π(X). What only feeds the rule (the gradient the projector and the sketch read) takes
    one pass: its leak is removed by the Π on the step."""
    if H.shape[-1] == 0:
        return X
    for _ in range(passes):
        X = X - H @ (H.mT @ X) if side == "left" else X - (X @ H) @ H.mT
    return X


def _from_side(X: torch.Tensor, side: str) -> torch.Tensor:
    """X (B, m, n) as (B, d, ·): its columns are vectors of the protected side."""
    return X if side == "left" else X.mT


def truncate(Z: torch.Tensor, ell: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Z (d, w) cut to its top ℓ directions: with Z Zᵀ = Q diag(λ₁ ≥ …) Qᵀ, Q_{:, :ℓ}
    diag(√λᵢ)_{i ≤ ℓ}, and the energy cut off, Σ_{i>ℓ} λᵢ. The eigenpairs come
    from the smaller Gram matrix, Z Zᵀ (d ≤ w) or ZᵀZ = V diag(λ) Vᵀ with Q = Z V λ^{-1/2};
    where LAPACK's eigh fails on it (a rank-deficient fp32 Gram can make it raise, or return
    NaNs), from the SVD Z = Q diag(√λ) Vᵀ."""
    gram = Z @ Z.mT if Z.shape[0] <= Z.shape[1] else Z.mT @ Z
    try:
        lam, Q = torch.linalg.eigh(gram)                     # ascending
        solved = host.read(lam, lambda lam: bool(lam.isfinite().all() and Q.isfinite().all()), True)
    except torch.linalg.LinAlgError:
        solved = False
    if solved:
        lam, Q = lam.flip(-1).clamp_min(0), Q.flip(-1)
        if Z.shape[0] > Z.shape[1]:
            Q = Z @ Q * torch.where(lam > 0, lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt(), 0)
    else:
        Q, sigma, _ = torch.linalg.svd(Z, full_matrices=False)
        lam = sigma.square()
    return Q[:, :ell] * lam[:ell].sqrt(), lam[ell:].sum()


def fold(H: torch.Tensor, count: torch.Tensor, X: torch.Tensor, active: torch.Tensor, energy: float,
         beyond: torch.Tensor | None = None):
    """Fold the directions of X (B, d, k) into the bases H (B, d, h_max) with ``count`` (B,)
    columns in use (the rest zero), for the matrices ``active`` (B,), ``beyond`` (B,) the
    energy of directions X no longer holds (see the module docstring). Returns the new H,
    count and a (B,) int8 flag: 1 where the history was or became full."""
    H, count = H.clone(), count.clone()
    full = torch.zeros(H.shape[0], dtype=torch.int8, device=H.device)
    h_max = H.shape[-1]
    for b in range(H.shape[0]):
        c = int(count[b])
        if not bool(active[b]):
            continue
        if c >= h_max:
            full[b] = 1
            continue
        Hb = H[b]
        Xb = X[b].to(H.dtype)
        Xb = Xb - Hb @ (Hb.mT @ Xb)
        U, sigma, _ = torch.linalg.svd(Xb, full_matrices=False)
        kept = sigma > NEGLIGIBLE * sigma[0] if sigma.numel() and sigma[0] > 0 else sigma > 0
        energies = sigma.square() * kept
        total = float(energies.sum())
        if total == 0:
            continue
        total += 0.0 if beyond is None else float(beyond[b])
        wanted = int((energies.cumsum(0) < energy * total).sum()) + 1
        wanted = min(wanted, int(kept.sum()))
        add = min(wanted, h_max - c)
        if wanted > add:
            full[b] = 1
        new = U[:, :add]
        new = new - Hb @ (Hb.mT @ new)
        new, _ = torch.linalg.qr(new)
        H[b, :, c:c + add] = new
        count[b] = c + add
    return H, count, full


class CoSOProjector:
    """GaLore's :class:`~matrixopt.projectors.SVDProjector` (``inner``) on Π(G), with the
    protected basis ``history`` as one more basis: the projector protocol of
    :mod:`matrixopt.projectors`, so :class:`~matrixopt.lowrank.LowRankAdamW` runs it as it
    runs GaLore's. ``left`` is set when either GaLore's projection or Π sums over G's rows,
    so those projections run on the owner of the whole matrix."""

    randomized = property(lambda self: self.inner.randomized)
    refresh_gives_low = False
    dtype = None   # project_back returns the history's dtype: Π is applied in fp32 (or fp64)

    whole_projections = False   # as SVDProjector's

    def __init__(self, inner, side: str, h_max: int, sketch_rank: int | None):
        self.inner, self.side, self.h_max, self.sketch_rank = inner, side, h_max, sketch_rank
        self.m, self.n, self.rank = inner.m, inner.n, inner.rank
        self.left = inner.left or side == "left"
        self.d = self.m if side == "left" else self.n
        self.keys = (*inner.keys, "history", "history_count")
        self.basis_dims = {**inner.basis_dims, "history": (self.d, h_max), "history_count": ()}
        self.low_dims = inner.low_dims

    def whole_low(self) -> bool:
        """Whether L and the moments are whole per matrix: GaLore's or Π's projection sums
        over G's rows, or a single row, or the param's pieces ask for it
        (:meth:`~matrixopt.projectors.SVDProjector.whole_low`)."""
        return whole_low(self.left, self.m, self.whole_projections)

    def low_shape(self, batch: int):
        return self.inner.low_shape(batch)

    def basis(self, batch: int, batched: bool) -> dict[str, State]:
        """GaLore's bases, then ``history`` (B, d, h_max), ``history_count`` (B,) and, with
        a sketch, its accumulator ``sketch`` (B, d, b): whole per matrix, zeros to start."""
        state = {**self.inner.basis(batch, batched), "history": State((batch, self.d, self.h_max), AT_LEAST_FP32),
                 "history_count": State((batch,), torch.int32)}
        if self.sketch_rank:
            state["sketch"] = State((batch, self.d, self.sketch_rank), AT_LEAST_FP32)
            state["sketch_energy"] = State((batch,), AT_LEAST_FP32)
        return state

    def refresh_outputs(self, dtype):
        *bases, status = self.inner.refresh_outputs(dtype)
        return [*bases, Out(self.basis_dims["history"], dtype, whole=True), Out((), torch.int32, whole=True), status]

    def refresh(self, G, *previous, seeds=None, warm=True):
        """GaLore's refresh of Π(G); the history passes through unchanged."""
        *inner, H, count = previous
        *bases, status = self.inner.refresh(self.outside(G, H, count), *inner, seeds=seeds, warm=warm)
        return (*bases, H, count, status)

    def outside(self, G, H, count):
        """Π(G) in the history's dtype, one pass: it only feeds the projector and the sketch."""
        return complement(G.to(H.dtype), protected(H, count), self.side, passes=1)

    def project(self, G, *bases):
        *inner, H, count = bases
        return self.inner.project(self.outside(G, H, count), *inner)

    def project_back(self, L, *bases):
        *inner, H, count = bases
        return complement(self.inner.project_back(L, *inner).to(H.dtype), protected(H, count), self.side)

    def transition(self, old, new):
        return self.inner.transition(old, new)

    def carry(self, M, V, transition):
        return self.inner.carry(M, V, transition)


def _accumulate(proj, G, H, count, A, seeds):
    """The accumulators A (B, d, b) after a step: A + Y Ω/√b, Y = Π(G) from the protected side
    (d×k), Ω (k×b) standard normal, drawn in fp32 by a generator seeded with ``seeds`` (B,),
    one per matrix."""
    Y = _from_side(proj.outside(G, H, count), proj.side).to(A.dtype)
    b = A.shape[-1]
    omega = torch.stack([torch.randn(Y.shape[-1], b, generator=torch.Generator(Y.device).manual_seed(seed),
                                     device=Y.device, dtype=torch.float32)
                         for seed in host.read(seeds, torch.Tensor.tolist, [0] * len(seeds))])
    return torch.baddbmm(A, Y, omega.to(A.dtype), alpha=b ** -0.5)


def _truncate(H, count, A, E):
    """Each sketch S = H[:, c:] (ℓ = h_max − c columns) takes in its accumulator: S ← the top
    ℓ directions of [S, A], E ← E + the energy cut off, A ← 0."""
    H, E = H.clone(), E.clone()
    for b, c in enumerate(host.read(count, torch.Tensor.tolist, [0] * len(count))):   # fake: a first task's
        if c < H.shape[-1]:
            H[b, :, c:], cut = truncate(torch.cat([H[b, :, c:], A[b]], dim=-1), H.shape[-1] - c)
            E[b] += cut
    return H, torch.zeros_like(A), E


def _decayed(side, W, H, count):
    """Π(W) (the part of W weight decay may act on), in W's dtype."""
    return complement(W.to(H.dtype), protected(H, count), side).to(W.dtype)


def _fold_task(side, history_energy, weight_energy, *, history, count, active, sketch=None, energy=None,
               weights=None) -> dict:
    """A task boundary for a stack: the sketch (``sketch``, its accumulator, and ``energy``,
    what its truncations cut off) folded into the history and reset, then the ``weights``;
    each only where given. Returns the new ``history``, ``count``, ``sketch`` and
    ``energy`` (where given) and ``full``, a (B,) int8 flag per matrix."""
    full = torch.zeros(history.shape[0], dtype=torch.int8, device=history.device)
    H, out = history, {}
    if sketch is not None:   # X = [S, A]: the sketch (in H beyond count) and what it has not taken in yet
        bases, S = split_history(H, count)
        H, count, f = fold(torch.where(active[:, None, None], bases, H), count, torch.cat([S, sketch], dim=-1),
                           active, history_energy, energy)
        full |= f
        out = {"sketch": torch.where(active[:, None, None], torch.zeros_like(sketch), sketch),
               "energy": torch.where(active, 0, energy)}
    if weights is not None:
        H, count, f = fold(H, count, _from_side(weights, side), active, weight_energy)
        full |= f
    return {"history": H, "count": count, **out, "full": full}


def coso_projector(m: int, n: int, *, rank, proj_type, svd, proj_dtype, side, max_history, sketch_rank,
                   protect) -> CoSOProjector:
    """The CoSO projector of m×n matrices for a group's settings."""
    inner = svd_projector(m, n, rank=rank, proj_type=proj_type, svd=svd, proj_dtype=proj_dtype)
    h_max = resolve_rank(max_history, m, n)
    b = None
    if protect != "weights":
        b = resolve_rank(sketch_rank, m, n) if sketch_rank is not None else inner.rank   # ≤ min(m, n) ≤ d
    return CoSOProjector(inner, side, h_max, b)


class ProtectedFallback:
    """A fallback rule (``inner``, default :class:`~matrixopt.fallback.AdamW`) whose updates
    leave the entries earlier tasks used unchanged (``protect_fallback``; the rule is in the
    module docstring): the fallback protocol of :mod:`matrixopt.fallback`, plus
    :meth:`end_task`. Costs a copy of each protected fallback param per step."""

    def __init__(self, inner):
        self.inner = inner
        self.hyperparameters = {**inner.hyperparameters, "protect_fallback": choice(True, False)}
        self.elementwise = getattr(inner, "elementwise", False)   # the mask is element-wise too

    def state(self, p, group) -> dict[str, State]:
        mask = State(tuple(p.shape), torch.bool, sharded=True)
        return {**self.inner.state(p, group), "protected": mask, "touched": mask}

    def update(self, group, weights, grads, states) -> None:
        for g, s in zip(grads, states):
            s["touched"].logical_or_(g != 0)
        if not group["protect_fallback"]:
            self.inner.update(group, weights, grads, states)
            return
        before = [w.clone() for w in weights]
        self.inner.update(group, weights, grads, states)
        for w, old, s in zip(weights, before, states):
            torch.where(s["protected"], old, w, out=w)

    @staticmethod
    def end_task(states) -> None:
        """Ω ← Ω ∨ T, T ← 0 for each state."""
        for s in states:
            s["protected"].logical_or_(s["touched"])
            s["touched"].zero_()


class CoSOAdamW(LowRankAdamW):
    r"""GaLore-style AdamW for continual learning: every update orthogonal to a protected
    subspace of each matrix, grown task by task (CoSO) and/or taken from the weights
    (Sculpting Subspaces). The rule is defined in :mod:`matrixopt.coso`.

    Call :meth:`end_task` when a task's training ends (on every rank when distributed).

    This is :class:`~matrixopt.lowrank.LowRankAdamW` with a :class:`CoSOProjector` (an
    :class:`~matrixopt.projectors.SVDProjector` on Π(G)).

    Args (as :class:`~matrixopt.GaLoreAdamW`: params, lr, betas, eps, rank, update_proj_gap,
    scale, proj_type, svd, reproject_states, seed, proj_dtype, nonfinite, fallback,
    distributed, process_group, state_precision, master_weights), and:
        weight_decay: λ, applied to Π(W) only (decay of W inside H would erase what is
            protected); default 0.
        protect: "gradients" (default; CoSO), "weights" (Sculpting Subspaces) or "both".
        side: the protected side, "right" (default: a Linear's input space) or "left".
        history_energy: e for the sketch at ``end_task`` (default 0.95).
        weight_energy: e for the weights at a task's start (default 0.5).
        max_history: h_max, the most protected directions per matrix, an int or a fraction
            of min(m, n) (default 1.0); memory: d·h_max floats per matrix.
        sketch_rank: b, the sketch accumulator's columns, an int or a fraction of min(m, n)
            (default: the rank r); d·b floats per matrix (the sketch itself lives in the
            history's free columns).
        sketch_gap: j, steps between the accumulator's truncations into the sketch (default 5).
        protect_fallback: keep the entries of fallback params that earlier tasks used
            (default True); False: the fallback runs unprotected.
        fallback: as for every optimizer; CoSOAdamW wraps it (default AdamW) in a
            :class:`ProtectedFallback`.
    """

    hyperparameters = {
        **GaLoreAdamW.hyperparameters,
        "protect": choice(*PROTECT),
        "side": choice("left", "right"),
        "history_energy": real(0.0, 1.0, lo_open=True),
        "weight_energy": real(0.0, 1.0, lo_open=True),
        "max_history": rank_spec,
        "sketch_rank": lambda name, value: value is None or rank_spec(name, value),
        "sketch_gap": integer(1),
    }

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, rank=128,
                 update_proj_gap=200, scale=None, proj_type="std", svd="randomized", reproject_states=False,
                 protect="gradients", side="right", history_energy=0.95, weight_energy=0.5, max_history=1.0,
                 sketch_rank=None, sketch_gap=5, protect_fallback=True, nonfinite="skip", seed=0, proj_dtype=None, *,
                 fallback=None, distributed=None, process_group=None, state_precision="fp32",
                 master_weights=DEFAULT_MASTER_WEIGHTS):
        self._full_warned: set[str] = set()
        fallback = ProtectedFallback(AdamW() if fallback is None else fallback)
        super().__init__(params, coso_projector,
                         ("rank", "proj_type", "svd", "proj_dtype", "side", "max_history", "sketch_rank", "protect"),
                         lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                         update_proj_gap=update_proj_gap, scale=scale, proj_dtype=proj_dtype, nonfinite=nonfinite,
                         carry_moments="reproject_states", fallback=fallback, distributed=distributed,
                         process_group=process_group, state_precision=state_precision,
                         master_weights=master_weights, proj_type=proj_type, svd=svd,
                         reproject_states=reproject_states, seed=seed, protect=protect, side=side,
                         history_energy=history_energy, weight_energy=weight_energy, max_history=max_history,
                         sketch_rank=sketch_rank, sketch_gap=sketch_gap, protect_fallback=protect_fallback)

    # -- the step --------------------------------------------------------------------------------
    def _update(self, group, bucket):
        proj = self._bucket_projector(group, bucket)
        steps = [s["step"] for s in bucket.states]   # t, before this step counts
        if group["protect"] != "gradients" and 0 in steps:   # a task starts: protect W's top subspace
            self._task_boundary(group, proj, bucket, [t == 0 for t in steps], sketch=False)
        super()._update(group, bucket)
        if proj.sketch_rank:
            self._sketch(group, proj, bucket, steps)

    def _sketch(self, group, proj, bucket, steps):
        """Each accumulator takes step t's Π(G) (``steps``: each entry's t); after the steps
        with (t + 1) mod ``sketch_gap`` = 0 the sketches take the accumulators in."""
        states = bucket.states
        H = [s["history"] for s in states]
        count = [s["history_count"] for s in states]
        A = [s["sketch"] for s in states]
        E = [s["sketch_energy"] for s in states]
        seeds = bucket_seeds(bucket, range(len(states)), steps, seed=group["seed"], stream=(SKETCH_STREAM,))
        (new,) = bucket.matrix_map(functools.partial(_accumulate, proj),
                                   [Rows(bucket.grads), Whole(H), Whole(count), Whole(A), Whole(seeds)],
                                   [Out(A[0].shape[-2:], A[0].dtype, whole=True)])
        for a, fresh in zip(A, new):
            a.copy_(fresh)
        due = [i for i, t in enumerate(steps) if (t + 1) % group["sketch_gap"] == 0]
        if due:
            H, count, A, E = ([ts[i] for i in due] for ts in (H, count, A, E))
            new = bucket.matrix_map(_truncate, [Whole(H), Whole(count), Whole(A), Whole(E)],
                                    [Out(H[0].shape[-2:], H[0].dtype, whole=True),
                                     Out(A[0].shape[-2:], A[0].dtype, whole=True), Out((), E[0].dtype, whole=True)],
                                    entries=due)
            for old, fresh in zip(H + A + E, [t for ts in new for t in ts]):
                old.copy_(fresh)

    def _apply(self, group, proj, bucket, steps, scale):
        """W ← W − ηλ·Π(W) − η·s·project_back(S): weight decay in the complement only
        (decaying W inside H would erase what is protected)."""
        updates = back_projections(proj, steps, bucket)
        if group["weight_decay"] and float(group["lr"]):
            self._decay(group, proj, bucket)
        torch._foreach_add_(bucket.weights, updates, alpha=-float(group["lr"]) * scale)

    def _decay(self, group, proj, bucket):
        """W ← W − ηλ·Π(W)."""
        histories = [s["history"] for s in bucket.states]
        counts = [s["history_count"] for s in bucket.states]
        fn = functools.partial(_decayed, proj.side)
        if proj.side == "left" or proj.whole_projections:   # over rows, or over columns ranks split
            (decays,) = bucket.matrix_map(fn, [Rows(bucket.weights), Whole(histories), Whole(counts)],
                                          [Out(bucket.shape, bucket.weights[0].dtype)])
        else:   # row-local
            decays = [fn(w, local_matrices(p, h), local_matrices(p, c))
                      for p, w, h, c in zip(bucket.params, bucket.weights, histories, counts)]
        torch._foreach_add_(bucket.weights, decays, alpha=-float(group["lr"]) * group["weight_decay"])

    # -- task boundaries -------------------------------------------------------------------------
    @torch.no_grad()
    def end_task(self) -> None:
        """The current task is finished: fold each matrix's sketch (``protect`` "gradients"
        or "both") and then its weights ("weights" or "both") into its protected history,
        and start a new sketch; the entries of fallback params this task used join their
        protected entries. Params that never stepped have nothing to fold (their weights are
        protected at their first step). Distributed, every rank must call it."""
        for group in self.param_groups:
            self.fallback.end_task([self.state[p] for p in group["params"]
                                    if not self.is_matrix(group, p) and self.state.get(p)])
        self.for_each_bucket(lambda group, bucket: self._task_boundary(
            group, self._bucket_projector(group, bucket), bucket, [True] * len(bucket.params), sketch=True))

    def _task_boundary(self, group, proj, bucket, active, *, sketch: bool):
        """Fold the sketches (if ``sketch`` and the group keeps one) and the weights (if the
        group protects them) of the bucket's entries flagged ``active`` into their histories."""
        use_sketch = sketch and proj.sketch_rank is not None
        use_weights = group["protect"] != "gradients"
        if not (use_sketch or use_weights):
            return
        states = bucket.states
        H = [s["history"] for s in states]
        flags = [torch.full((h.shape[0],), a, dtype=torch.bool, device=h.device) for a, h in zip(active, H)]
        inputs = {"history": Whole(H), "count": Whole([s["history_count"] for s in states]), "active": Whole(flags)}
        outputs = {"history": Out(H[0].shape[-2:], H[0].dtype, whole=True), "count": Out((), torch.int32, whole=True)}
        if use_sketch:
            A, E = [s["sketch"] for s in states], [s["sketch_energy"] for s in states]
            inputs.update(sketch=Whole(A), energy=Whole(E))
            outputs.update(sketch=Out(A[0].shape[-2:], A[0].dtype, whole=True), energy=Out((), E[0].dtype, whole=True))
        if use_weights:
            inputs["weights"] = Rows(bucket.weights)
        outputs["full"] = Out((), torch.int8, whole=True)
        fn = functools.partial(_fold_task, proj.side, group["history_energy"], group["weight_energy"])
        results = named_map(bucket.matrix_map, fn, inputs, outputs)
        for name, key in (("history", "history"), ("count", "history_count"), ("sketch", "sketch"),
                          ("energy", "sketch_energy")):
            for s, new in zip(states, results.get(name, ())):
                s[key].copy_(new)
        full = [self._param_name(group, i) for i, f in zip(bucket.places, results["full"]) if bool(f.any())]
        warn_once(self._full_warned, full,
                  f"{type(self).__name__}: the protected history of {{}} is full (max_history): its "
                  "newest directions were cut to fit and no more will be added (warned once per param)")
