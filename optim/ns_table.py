"""The Newton-Schulz triples matrixopt ships: Muon's quintic and the table of per-shape
triples fitted offline (``data/ns_coefficients.json``, written by :mod:`matrixopt.ns_fit`,
read by :mod:`matrixopt.orthogonalize`)."""
import functools
import json
from pathlib import Path

#: Keller Jordan's quintic, the one torch.optim.Muon uses at every step.
MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

TABLE_PATH = Path(__file__).with_name("data") / "ns_coefficients.json"
TABLE_STEPS = 5


@functools.cache
def shipped_table() -> dict[tuple[int, int], tuple[float, float, float]]:
    """The fitted triples shipped for LLaMA shapes: (min(m, n), max(m, n)) → (a, b, c)."""
    table = json.loads(TABLE_PATH.read_text())
    return {tuple(int(v) for v in key.split("x")): tuple(abc)
            for key, abc in table["coefficients"].items()}
