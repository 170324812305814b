"""The structure ARCHITECTURE.md promises, checked on the running code.

- One step's path through the package's rooms: the shell (the torch.optim adapter, the
  planner, the executor, state, matrices, distribution), the rules' shared mechanics
  (``ops.py``), the rules (one file per optimizer, projectors, orthogonalize) and the
  kernels. A crossing is a call from a function in one room into a function in another
  (returns are not counted; calls into torch are not counted, nor calls between files of
  one room), traced with ``sys.settrace`` on a warm step over one matrix: a plain Muon step
  crosses at most 8 times, a plain GaLoreAdamW step at most 12, and a rule never calls
  back into the shell.
- ``optim/`` has no import cycle, no class over 300 lines and no function over 50 lines
  of code.
- ``import matrixopt`` and every optimizer's step need neither numpy nor scipy.
- A new optimizer is one file: a rule declared with ``State`` and a functional update works
  with the shell's state creation, state dicts and state_bytes, as ARCHITECTURE.md shows.
"""
import ast
import graphlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch

import matrixopt
from matrixopt import kernels

PACKAGE_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (matrixopt, kernels))
OPTIM = Path(matrixopt.__file__).parent
#: The shell's files: what torch.optim sees and everything a step is planned and run with.
SHELL = {"optimizer.py", "plan.py", "execute.py", "state.py", "precision.py", "distributed.py", "matrices.py",
         "validation.py", "backward.py", "protocols.py", "batching.py", "weights.py", "routing.py"}
#: What rules and shell share: the matrix-map seam and update, seeds, warnings.
MECHANICS = {"ops.py", "seeding.py", "report.py"}


def _ours(frame) -> bool:
    return os.path.abspath(frame.f_code.co_filename).startswith(PACKAGE_DIRS)


def _file(frame) -> str:
    """``kernels/<file>`` for a kernel, else the file's name in ``optim/``."""
    path = os.path.abspath(frame.f_code.co_filename)
    return ("kernels/" if path.startswith(PACKAGE_DIRS[1]) else "") + os.path.basename(path)


def room(file: str) -> str:
    if file.startswith("kernels/"):
        return "kernels"
    if file in MECHANICS:
        return "mechanics"
    return "shell" if file in SHELL else "rules"


def step_path(opt) -> list[tuple[str, str, str]]:
    """(caller's file, callee's file, callee) for every call of a matrixopt function in one
    ``opt.step()``; the caller is the nearest matrixopt frame below (None for the entry)."""
    path = []

    def tracer(frame, event, arg):
        if event == "call" and _ours(frame):
            caller = frame.f_back
            while caller is not None and not _ours(caller):
                caller = caller.f_back
            path.append((caller and _file(caller), _file(frame), frame.f_code.co_name))

    sys.settrace(tracer)
    try:
        opt.step()
    finally:
        sys.settrace(None)
    return path


def crossings(path) -> list[tuple[str, str, str]]:
    """The calls of ``path`` from one room into another. A read through the host seam
    (``kernels/host.py``) stands where ``Tensor.tolist`` stood, a call into torch: not counted."""
    return [(a, b, name) for a, b, name in path if a is not None and room(a) != room(b) and b != "kernels/host.py"]


def warm(cls, shape, **kwargs):
    """``cls`` over one matrix, two steps in (state made, no refresh due), a gradient set."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(*shape))
    opt = cls([p], lr=0.01, **kwargs)
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    p.grad = torch.randn_like(p)
    return opt


def no_call_back_into_the_shell(path) -> bool:
    return not [(a, b, name) for a, b, name in path if room(a) != "shell" and room(b) == "shell"]


@pytest.mark.parametrize("shape", [(8, 12), (12, 8)])
def test_a_muon_step_crosses_at_most_8_room_boundaries(shape):
    path = crossings(step_path(warm(matrixopt.Muon, shape)))
    assert len(path) <= 8, path
    assert ("orthogonalize.py", "kernels/newton_schulz.py", "newton_schulz") in path   # the path reaches the kernel
    assert no_call_back_into_the_shell(path), path


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
@pytest.mark.parametrize("shape", [(8, 12), (12, 8)])
def test_a_galore_step_crosses_at_most_12_room_boundaries(shape, proj_type):
    path = crossings(step_path(warm(matrixopt.GaLoreAdamW, shape, rank=2, proj_type=proj_type)))
    assert len(path) <= 12, path
    assert {name for *_, name in path} >= {"project", "project_back"}
    assert no_call_back_into_the_shell(path), path


@pytest.mark.parametrize("cls, kwargs", [
    (matrixopt.GaLoreAdamW, dict(rank=2, update_proj_gap=2)),   # the traced step (t = 2) refreshes
    (matrixopt.CoSOAdamW, dict(rank=2, update_proj_gap=2, sketch_gap=3)),   # and truncates the sketch
    (matrixopt.ARO, {}), (matrixopt.ROOT, {}), (matrixopt.DCTAdamW, dict(rank=2, update_proj_gap=2))])
def test_no_rule_calls_back_into_the_shell(cls, kwargs):
    """Refresh steps, CoSO's sketch and every rule: what a rule needs comes in its bucket."""
    path = step_path(warm(cls, (12, 8), **kwargs))
    names = {name for *_, name in path}
    assert "_warn_refreshes" in names or cls not in (matrixopt.GaLoreAdamW, matrixopt.CoSOAdamW), names
    assert "_truncate" in names or cls is not matrixopt.CoSOAdamW, names
    assert no_call_back_into_the_shell(crossings(path)), crossings(path)


def _code_lines(lines: list[str], node) -> int:
    """Lines of ``node`` that hold code: not blank, not only a comment, not a docstring."""
    docstrings = set()
    for n in ast.walk(node):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and ast.get_docstring(n):
            docstrings.update(range(n.body[0].lineno, n.body[0].end_lineno + 1))
    return sum(1 for i in range(node.lineno, node.end_lineno + 1)
               if i not in docstrings and lines[i - 1].strip() and not lines[i - 1].strip().startswith("#"))


def test_no_class_over_300_lines_and_no_function_over_50_lines_of_code():
    too_long = []
    for path in sorted(OPTIM.glob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300:
                too_long.append(f"{path.name}: class {node.name}, {node.end_lineno - node.lineno + 1} lines")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(lines, node) > 50:
                too_long.append(f"{path.name}: {node.name}, {_code_lines(lines, node)} lines of code")
    assert not too_long, too_long


def test_optim_has_no_import_cycle():
    """Every relative import in ``optim/``, the ones inside functions too, points one way."""
    modules = {path.stem: path for path in OPTIM.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        graph[name] = imported & modules.keys()
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        pytest.fail(f"import cycle: {error.args[1]}")


def test_the_path_the_tracer_sees_includes_a_refresh():
    """The tracer is not blind: a refresh step goes through the SVD kernel."""
    opt = warm(matrixopt.GaLoreAdamW, (12, 8), rank=2, update_proj_gap=2)
    assert "lowrank_svd" in {name for *_, name in step_path(opt)}


def test_import_and_steps_need_neither_numpy_nor_scipy():
    """In a fresh interpreter where, once torch is imported (torch itself imports numpy when
    it is installed), numpy and scipy cannot be imported, matrixopt imports and every
    optimizer steps, ROOT also on a shape no table has (fitting needs scipy: it warns and
    uses Muon's triple)."""
    code = textwrap.dedent("""
        import sys, warnings
        import torch
        for name in list(sys.modules):
            if name.split(".")[0] in ("numpy", "scipy"):
                sys.modules[name] = None      # `import numpy` now raises ImportError
        warnings.simplefilter("ignore")
        import matrixopt
        for cls in (matrixopt.Muon, matrixopt.ROOT, matrixopt.ARO, matrixopt.GaLoreAdamW, matrixopt.DCTAdamW):
            p = torch.nn.Parameter(torch.randn(128, 512))
            q = torch.nn.Parameter(torch.randn(16, 24))
            b = torch.nn.Parameter(torch.randn(512))
            opt = cls([p, q, b], lr=0.01)
            for _ in range(2):
                p.grad, q.grad, b.grad = torch.randn_like(p), torch.randn_like(q), torch.randn_like(b)
                opt.step()
        assert "scipy" not in sys.modules
        from matrixopt.orthogonalize import MUON_COEFFICIENTS, root_coefficients
        assert root_coefficients(16, 24) == MUON_COEFFICIENTS
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# -- the recipe of ARCHITECTURE.md: a new optimizer in one file ----------------------------------

from matrixopt import Out, Rows, State, apply_update, local_map  # noqa: E402
from matrixopt.validation import real  # noqa: E402


def sign_momentum(weights, grads, momenta, *, lr, beta, weight_decay, shape, matrix_map=local_map):
    """W ← W(1 − ηλ) − η·sign(M), M ← βM + (1 − β)G (a rule with whole-matrix work: none
    needed, but routed through the map to exercise the seam)."""
    torch._foreach_lerp_(momenta, grads, 1 - beta)
    (updates,) = matrix_map(torch.sign, [Rows(momenta)], [Out(shape, momenta[0].dtype)])
    apply_update(weights, updates, lr=lr, weight_decay=weight_decay, scale=1.0)


class SignMomentum(matrixopt.MatrixOptimizer):
    hyperparameters = {"beta": real(0.0, 1.0, hi_open=True)}

    def __init__(self, params, lr=1e-3, beta=0.9, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                 nonfinite="skip"):
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay, betas=betas, eps=eps,
                                      nonfinite=nonfinite))

    def _state(self, p, group):
        return {"momentum": State(tuple(p.shape), torch.float32, sharded=True)}

    def _update(self, group, bucket):
        sign_momentum(bucket.weights, bucket.grads, [s["momentum"].view_as(w) for s, w in
                                                     zip(bucket.states, bucket.weights)],
                      lr=group["lr"], beta=group["beta"], weight_decay=group["weight_decay"],
                      shape=bucket.shape, matrix_map=bucket.matrix_map)


def test_a_new_rule_gets_state_checkpoints_and_validation_from_the_shell():
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4))
    opt = SignMomentum([w, b], lr=0.1)
    w0 = w.detach().clone()
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    opt.step()
    # By hand: M = 0.1·1, W = W0 − 0.1·sign(M).
    torch.testing.assert_close(w.detach(), w0 - 0.1, rtol=0, atol=0)
    assert opt.state[w]["momentum"].dtype == torch.float32
    assert set(opt.state[b]) == {"step", "exp_avg", "exp_avg_sq"}       # the fallback's
    # 6·4 fp32 momentum, 2·4 fp32 fallback moments.
    assert opt.state_bytes() == 4 * 24 + 2 * 4 * 4
    sd = opt.state_dict()
    sd["state"][0]["momentum"] = torch.zeros(4, 6)
    with pytest.raises(ValueError, match=r"'momentum' has shape \(4, 6\), expected \(6, 4\)"):
        SignMomentum([w, b]).load_state_dict(sd)
    with pytest.raises(ValueError, match="beta"):
        SignMomentum([w], beta=1.0)


# -- the functional layer: each rule's math runs without an optimizer object ----------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_functional_adamw_is_torch_adamw(dtype):
    """fp32 weights: torch.optim.AdamW(fused=True) bit for bit; bf16 weights (fp32 moments):
    torch.optim.AdamW(foreach=True) on fp32 master weights, rounded to bf16 each step."""
    from matrixopt.fallback import adamw

    torch.manual_seed(0)
    w, ref = torch.randn(5, 3).to(dtype), torch.nn.Parameter(torch.randn(5, 3))
    ref.data.copy_(w)
    m, v = torch.zeros(5, 3), torch.zeros(5, 3)
    opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            **({"fused": True} if dtype == torch.float32 else {"foreach": True}))
    for t in range(1, 6):
        g = torch.randn(5, 3, generator=torch.Generator().manual_seed(t))
        ref.grad = g.to(dtype).float()
        opt.step()
        if dtype != torch.float32:
            ref.data.copy_(ref.data.to(dtype))   # the bf16 weight is what the next step starts from
        adamw([w], [g.to(dtype)], [m], [v], [t], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert torch.equal(w, ref.detach().to(dtype))


def test_functional_adamw_keeps_fp64_weights_in_fp64():
    """fp64 weights (fp32 moments) get the step in fp64: an update far below fp32's resolution
    at 1.0 is kept, as torch.optim.AdamW (fp64 moments) keeps it, to the moments' rounding."""
    from matrixopt.fallback import adamw

    w0 = torch.tensor([1 + 1e-12, 2.0, -3.0], dtype=torch.float64)
    w, ref = w0.clone(), torch.nn.Parameter(w0.clone())
    m, v = torch.zeros(3), torch.zeros(3)
    opt = torch.optim.AdamW([ref], lr=1e-9, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    for t in range(1, 4):
        g = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64) * t
        ref.grad = g.clone()
        opt.step()
        adamw([w], [g], [m], [v], [t], lr=1e-9, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    step, want = w - w0, ref.detach() - w0            # ~3e-9: 1.0's fp32 spacing is 1.2e-7
    assert ((step - want).abs() <= 1e-6 * want.abs()).all(), (step, want)


def test_functional_muon_is_the_formula_in_float64():
    """muon() over plain tensors, against the update written out with an SVD-free float64
    Newton-Schulz of the Nesterov input."""
    from matrixopt.muon import muon
    from matrixopt.orthogonalize import MUON_COEFFICIENTS

    torch.manual_seed(0)
    W, G = torch.randn(1, 6, 10, dtype=torch.float64), torch.randn(1, 6, 10, dtype=torch.float64)
    B = torch.randn(1, 6, 10, dtype=torch.float64)
    W0, B0 = W.clone(), B.clone()
    muon([W], [G], [B], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, schedule=[MUON_COEFFICIENTS] * 5,
         scale=1.5, ns_dtype=torch.float64)
    B_want = 0.9 * B0 + 0.1 * G
    X = 0.1 * G + 0.9 * B_want
    X = X / X.norm()
    a, b, c = MUON_COEFFICIENTS
    for _ in range(5):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    torch.testing.assert_close(B, B_want, rtol=1e-14, atol=0)
    torch.testing.assert_close(W, W0 * (1 - 0.1 * 0.01) - 0.1 * 1.5 * X, rtol=1e-10, atol=1e-12)


def test_warnings_point_at_the_caller_of_step_also_through_grad_scaler():
    """No hand-counted stacklevel: the non-finite warning names this file, whether step() is
    called directly or through GradScaler (more frames in between)."""
    for through_scaler in (False, True):
        p = torch.nn.Parameter(torch.randn(4, 4))
        opt = matrixopt.Muon([p], lr=0.01)
        p.grad = torch.full_like(p, float("nan"))
        with pytest.warns(RuntimeWarning, match="Non-finite") as record:
            if through_scaler:
                torch.amp.GradScaler("cpu", enabled=False).step(opt)
            else:
                opt.step()
        assert record[0].filename == __file__


def test_large_matrices_are_not_stacked_on_a_cpu():
    """Batching only where it pays (the step benchmark's batching table): on a CPU, same-shape
    matrices from 2^18 elements (2^14 for the low-rank rules) run one per bucket, with no
    copy into a stack; smaller ones share one stack."""
    def step_stacks(cls, shape, **kw):
        params = [torch.nn.Parameter(torch.randn(shape)) for _ in range(4)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = cls(params, lr=0.01, **kw)
        opt.step()   # state made (and a low-rank rule's first refresh)
        cats = []
        real_cat = torch.cat
        with mock.patch("torch.cat", side_effect=lambda ts, *a, **k: cats.append(len(ts)) or real_cat(ts, *a, **k)):
            opt.step()
        return [len(b) for b in opt._planner.buckets(opt.param_groups[0], params, opt._limits())], max(cats, default=0)

    assert step_stacks(matrixopt.Muon, (256, 256)) == ([4], 4)
    assert step_stacks(matrixopt.Muon, (512, 512)) == ([1, 1, 1, 1], 0)
    assert step_stacks(matrixopt.GaLoreAdamW, (64, 64), rank=16) == ([4], 4)
    assert step_stacks(matrixopt.GaLoreAdamW, (128, 128), rank=32) == ([1, 1, 1, 1], 0)


def test_the_shipped_projectors_and_fallbacks_implement_their_protocols():
    """Every projector LowRankAdamW runs and every fallback the optimizers ship has each member
    of its protocol (``matrixopt.protocols``), the optional ones aside."""
    from matrixopt.protocols import Fallback, Projector

    p = torch.nn.Parameter(torch.randn(12, 8))
    for cls in (matrixopt.GaLoreAdamW, matrixopt.DCTAdamW, matrixopt.CoSOAdamW):
        opt = cls([p], rank=2)
        assert isinstance(opt._projector(opt.param_groups[0], 12, 8), Projector), cls
        assert isinstance(opt.fallback, Fallback), cls
    assert isinstance(matrixopt.AdamWFallback(), Fallback)
    assert not isinstance(object(), Projector) and not isinstance(object(), Fallback)


@pytest.mark.parametrize("cls", [matrixopt.Muon, matrixopt.GaLoreAdamW, matrixopt.CoSOAdamW])
def test_a_dropped_optimizer_frees_its_state_at_once(cls):
    """No reference cycle through the shell's parts: the last reference to an optimizer gone,
    its state is freed without waiting for the garbage collector (``del opt`` before
    ``torch.cuda.empty_cache()`` gives the memory back)."""
    import gc
    import weakref

    p = torch.nn.Parameter(torch.randn(12, 8))
    opt = cls([p], lr=0.01)
    p.grad = torch.randn_like(p)
    opt.step()
    opt.for_each_bucket(lambda group, bucket: None)
    state = weakref.ref(next(iter(opt.state[p].values())) if cls is matrixopt.Muon else opt.state[p]["exp_avg"])
    gc.disable()
    try:
        del opt
        assert state() is None
    finally:
        gc.enable()


def test_the_layout_cache_follows_the_groups_params():
    """The planner's cached layout of a group is made again when a param of it is replaced or
    changes shape, and a group removed (or replaced by a load) is forgotten, so it keeps no
    param alive."""
    import gc
    import weakref

    torch.manual_seed(0)
    p, q = torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(6, 4))
    opt = matrixopt.Muon([p], lr=0.01, lr_scaling="original")
    p.grad = torch.randn_like(p)
    opt.step()
    r = torch.nn.Parameter(torch.randn(8, 4))
    opt.param_groups[0]["params"][0] = r   # replaced in the list
    r.grad = torch.randn_like(r)
    opt.step()
    assert opt._planner.layout(opt.param_groups[0]).of(r).shape == (1, 8, 4)
    r.data = torch.randn(4, 8)             # a new shape, same tensor object
    r.grad = torch.randn_like(r)
    opt.state.pop(r)
    opt.step()
    assert opt._planner.layout(opt.param_groups[0]).of(r).shape == (1, 4, 8)
    opt.add_param_group({"params": [q]})
    q.grad = torch.randn_like(q)
    opt.step()
    gone = weakref.ref(q)
    opt.param_groups.pop()
    opt.state.pop(q)
    del q
    opt.step()
    gc.collect()
    assert gone() is None


def test_an_optimizer_pickles_after_distributed_steps(tmp_path):
    """The planner's caches (which hold params and process groups) do not travel: a replicated
    optimizer pickles and deep-copies after its first step, as before the split."""
    import copy
    import pickle

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        p = torch.nn.Parameter(torch.randn(6, 4))
        opt = matrixopt.Muon([p], lr=0.01, distributed="replicated")
        p.grad = torch.randn_like(p)
        opt.step()
        copied = copy.deepcopy(opt)
        loaded = pickle.loads(pickle.dumps(opt))
        for o in (copied, loaded):
            torch.testing.assert_close(next(iter(o.state.values()))["momentum_buffer"],
                                       opt.state[p]["momentum_buffer"], rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


def test_nonfinite_skips_can_be_reset():
    """``nonfinite_skips`` is a counter a training loop may read and reset, as before the split."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = matrixopt.Muon([p], lr=0.01)
    p.grad = torch.full_like(p, float("nan"))
    with pytest.warns(RuntimeWarning, match="Non-finite"):
        opt.step()
    assert opt.nonfinite_skips == 1
    opt.nonfinite_skips = 0
    opt.step()
    assert opt.nonfinite_skips == 1
