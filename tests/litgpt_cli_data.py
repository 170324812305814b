"""A litgpt DataModule that needs none of litgpt's data extras (which pull a CUDA torch): no
tokenizer, no download. `litgpt pretrain --data litgpt_cli_data.Counting` (this folder on
PYTHONPATH) trains on sequences that count up from a random start, modulo ``vocab``."""
from dataclasses import dataclass, field

import torch
from litgpt.data import DataModule
from torch.utils.data import DataLoader


@dataclass
class Counting(DataModule):
    vocab: int = 48
    samples: int = 256
    seed: int = 0
    batch_size: int = field(default=1, init=False)
    seq: int = field(default=16, init=False)

    def connect(self, tokenizer=None, batch_size=1, max_seq_length=None):
        self.batch_size, self.seq = batch_size, max_seq_length

    def _data(self, seed):
        starts = torch.randint(0, self.vocab, (self.samples, 1), generator=torch.Generator().manual_seed(seed))
        return (starts + torch.arange(self.seq + 1)) % self.vocab

    def train_dataloader(self):
        return DataLoader(self._data(self.seed), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self._data(self.seed + 1)[:4], batch_size=self.batch_size)
