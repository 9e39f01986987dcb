"""examples/own_loop.py's model and data in a PyTorch Lightning `Trainer`, grown by Esper's
callback (`pip install 'esper-core[lightning]'`).

    .venv/bin/python examples/own_loop_lightning.py                     # policy in this process
    .venv/bin/python examples/own_loop_lightning.py --controller stack  # Tamiyo decides

The last line is `RESULT {json}`, as own_loop.py prints it.
"""

from __future__ import annotations

import argparse
import warnings

import lightning
import torch
from own_loop import classifier, result_line, short_job_policy, signals
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from esper.integrations.lightning import EsperCallback

BATCH = 32


class SignalClassifier(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = classifier()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controller", choices=["local", "stack"], default="local")
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--name", default="own-loop-lightning")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="lightning")  # its tips, not the run's news

    lightning.seed_everything(args.seed, verbose=False)
    data = torch.Generator().manual_seed(0)
    x, y = signals(384, data)
    val_x, val_y = signals(192, data)
    module = SignalClassifier()
    train = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    val = DataLoader(TensorDataset(val_x, val_y), batch_size=len(val_y))

    def accuracy() -> float:  # the callback calls it in eval mode, without gradients
        return float((module(val_x).argmax(dim=1) == val_y).float().mean())

    callback = EsperCallback(
        name=args.name,
        evaluate=accuracy,
        controller=args.controller,
        epochs=args.epochs,
        loss_on_sample=lambda: F.cross_entropy(module(x[:128]), y[:128]),
        policy=short_job_policy() if args.controller == "local" else None,
    )
    trainer = lightning.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[callback],
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train, val)
    module.eval()
    with torch.no_grad():
        print(result_line(callback.run, accuracy()), flush=True)


if __name__ == "__main__":
    main()
