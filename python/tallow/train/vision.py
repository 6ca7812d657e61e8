"""``tallow train convnet`` and ``tallow train gan`` on scikit-learn's
bundled digits (1,797 8x8 grey images; nothing is downloaded).

The ConvNet is the seed's (Burn's MNIST example: conv blocks with batch
norm, dropout, two linear layers), sized for 8x8 inputs. The GAN is written
on the lower-level ``TrainLoop``: its step updates the discriminator and the
generator; checkpoints, resume, logs and torchrun are the loop's. Its
samples are scored by a trained ConvNet: inception score
exp(E_x KL(p(y|x) || p(y))) and the entropy of the predicted class
distribution p(y) (max ln 10 = 2.303 nats).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._extras import import_extra
from . import distributed as D
from .data import load_digits_tensors, stratified_split
from .loop import TrainLoop
from .trainer import Trainer


class DigitsConvNet(nn.Module):
    """[B, 1, 8, 8] in [0, 1] -> logits [B, 10]."""

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 64, dropout: float = 0.25,
                 batch_norm: bool = True):
        super().__init__()
        c1, c2 = channels
        norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), norm(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), norm(c2), nn.ReLU(),
            nn.MaxPool2d(2),  # [B, c2, 4, 4]
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c2 * 16, hidden), nn.ReLU(),
                                  nn.Linear(hidden, 10))
        self.config = {"channels": list(channels), "hidden": hidden, "dropout": dropout, "batch_norm": batch_norm}

    def forward(self, x):
        return self.head(self.features(x))


def save_module(model: nn.Module, out: Path, arch: str, extra: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"architectures": [arch], "tallow": model.config,
                                                 **(extra or {})}, indent=2))


def load_convnet(path: str | Path) -> DigitsConvNet:
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ValueError(f"--scorer: {str(p)!r} is not a ConvNet directory (no config.json)")
    cfg = json.loads((p / "config.json").read_text())
    if cfg.get("architectures") != ["DigitsConvNet"]:
        raise ValueError(f"--scorer: {str(p)!r} holds {cfg.get('architectures')}, expected DigitsConvNet")
    c = cfg["tallow"]
    m = DigitsConvNet(tuple(c["channels"]), c["hidden"], c["dropout"], c["batch_norm"])
    m.load_state_dict(load_file(str(p / "model.safetensors")))
    return m.eval()


def digits_split(seed: int = 0, val_fraction: float = 0.2):
    x, y = load_digits_tensors()
    tr, ho = stratified_split([str(int(v)) for v in y], val_fraction, seed)
    return (x[tr], y[tr]), (x[ho], y[ho])


def train_convnet(out: str | Path, *, epochs: int = 30, batch_size: int = 64, lr: float = 2e-3,
                  optimizer: str = "adamw", schedule: str = "cosine", seed: int = 0, val_fraction: float = 0.2,
                  batch_norm: bool = True, dropout: float = 0.25, live: Optional[bool] = None,
                  resume: Optional[str] = None, checkpoint_every: int = 0, log_every: int = 50) -> dict:
    (xt, yt), (xv, yv) = digits_split(seed, val_fraction)
    torch.manual_seed(seed)
    model = DigitsConvNet(batch_norm=batch_norm, dropout=dropout)
    tr = Trainer(model, torch.utils.data.TensorDataset(xt, yt), val_data=torch.utils.data.TensorDataset(xv, yv),
                 out_dir=out, num_classes=10, label_names=[str(i) for i in range(10)], optimizer=optimizer, lr=lr,
                 schedule=schedule, epochs=epochs, batch_size=batch_size, seed=seed, weight_decay=1e-4,
                 live=live, resume=resume, checkpoint_every=checkpoint_every, log_every=log_every,
                 restore_best=False,  # the held-out set reports; it does not choose the epoch
                 run_info={"task": "convnet", "dataset": "sklearn digits (load_digits)",
                           "split": {"held_out_fraction": val_fraction, "seed": seed, "n_train": len(yt),
                                     "n_held_out": len(yv)}})
    result = tr.fit()
    if tr.info.is_main:
        save_module(model, Path(out), "DigitsConvNet")
    return result


# -- GAN --------------------------------------------------------------------------------------

class Generator(nn.Module):
    def __init__(self, z_dim: int = 32, hidden: int = 256):
        super().__init__()
        self.z_dim = z_dim
        self.net = nn.Sequential(nn.Linear(z_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden * 2),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden * 2, 64), nn.Sigmoid())
        self.config = {"z_dim": z_dim, "hidden": hidden}

    def forward(self, z):
        return self.net(z).view(-1, 1, 8, 8)


class Discriminator(nn.Module):
    def __init__(self, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden * 2), nn.LeakyReLU(0.2), nn.Dropout(0.3),
                                 nn.Linear(hidden * 2, hidden), nn.LeakyReLU(0.2), nn.Dropout(0.3),
                                 nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


@torch.no_grad()
def inception_score(classifier: nn.Module, images: torch.Tensor, batch: int = 500) -> dict:
    """IS = exp(mean_x KL(p(y|x) || p(y))) and H(p(y)) under ``classifier``."""
    classifier.eval()
    probs = torch.cat([torch.softmax(classifier(images[i:i + batch]), -1) for i in range(0, len(images), batch)])
    py = probs.mean(0)
    kl = (probs * (torch.log(probs.clamp_min(1e-12)) - torch.log(py.clamp_min(1e-12)))).sum(1)
    return {"inception_score": float(torch.exp(kl.mean())),
            "class_entropy": float(-(py * torch.log(py.clamp_min(1e-12))).sum()),
            "class_distribution": [round(float(p), 4) for p in py], "n": len(images)}


def save_grid(images: torch.Tensor, path: Path, nrow: int = 10, title: str = "") -> None:
    matplotlib = import_extra("matplotlib", "train", "save_grid (image grids)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    rows = math.ceil(n / nrow)
    grid = torch.ones(rows * 9 + 1, nrow * 9 + 1)
    for i, im in enumerate(images):
        r, c = divmod(i, nrow)
        grid[1 + r * 9:1 + r * 9 + 8, 1 + c * 9:1 + c * 9 + 8] = 1 - im[0]
    fig, ax = plt.subplots(figsize=(nrow * 0.45 + 0.3, rows * 0.45 + (0.5 if title else 0.2)))
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_gan(out: str | Path, *, scorer: Optional[str | Path] = None, epochs: int = 100, batch_size: int = 64,
              lr: float = 2e-4, z_dim: int = 32, seed: int = 0, live: Optional[bool] = None,
              resume: Optional[str] = None, checkpoint_every: int = 0, grid_every: int = 25,
              log_every: int = 100, n_score: int = 5000) -> dict:
    out = Path(out)
    info = D.setup()
    if scorer is None:  # a ConvNet of our own to score the samples
        scorer = out / "scorer"
        if not (scorer / "model.safetensors").is_file():
            train_convnet(scorer, seed=seed, live=False, log_every=0)
    clf = load_convnet(scorer)
    x, _ = load_digits_tensors()  # the GAN sees every digit, no labels
    torch.manual_seed(seed)
    G, Dn = Generator(z_dim), Discriminator()
    optG = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.5, 0.999))
    optD = torch.optim.Adam(Dn.parameters(), lr=lr, betas=(0.5, 0.999))
    loop = TrainLoop(out, torch.utils.data.TensorDataset(x), batch_size=batch_size, epochs=epochs, seed=seed,
                     live=live, resume=resume, checkpoint_every=checkpoint_every, log_every=log_every,
                     run_info={"task": "gan", "dataset": "sklearn digits (load_digits), all 1797 images",
                               "z_dim": z_dim, "lr": lr, "scorer": str(scorer)}, dist_info=info)
    loop.register(G=G, D=Dn, optG=optG, optD=optD)
    g, d = loop.wrap(G), loop.wrap(Dn)
    fixed_z = torch.randn(100, z_dim, generator=torch.Generator().manual_seed(seed + 7))

    def step(batch, ctx):
        real = batch[0]
        b = len(real)
        z = torch.randn(b, z_dim)
        fake = g(z)
        # discriminator: one forward over real + fake (DDP: one forward per backward)
        logits = d(torch.cat([real, fake.detach()]))
        target = torch.cat([torch.full((b,), 0.9), torch.zeros(b)])  # one-sided label smoothing
        d_loss = F.binary_cross_entropy_with_logits(logits, target)
        optD.zero_grad(set_to_none=True)
        d_loss.backward()
        optD.step()
        # generator: fool the discriminator
        g_loss = F.binary_cross_entropy_with_logits(d(fake), torch.ones(b))
        optG.zero_grad(set_to_none=True)
        g_loss.backward()
        optG.step()
        rec = {"d_loss": float(d_loss.detach()), "g_loss": float(g_loss.detach())}
        loop.last_record = rec
        return rec

    def epoch_end(epoch):
        rec = {}
        if info.is_main and (grid_every and (epoch + 1) % grid_every == 0 or epoch + 1 == epochs):
            G.eval()
            with torch.no_grad():
                s = inception_score(clf, G(torch.randn(1000, z_dim, generator=torch.Generator().manual_seed(epoch))))
                save_grid(G(fixed_z), out / f"samples_epoch{epoch + 1:04d}.png", title=f"epoch {epoch + 1}")
            G.train()
            rec = {"inception_score": s["inception_score"], "class_entropy": s["class_entropy"]}
        return rec

    loop.run(step, epoch_end=epoch_end)
    result = {}
    if info.is_main:
        G.eval()
        with torch.no_grad():
            samples = G(torch.randn(n_score, z_dim, generator=torch.Generator().manual_seed(seed + 1)))
            save_grid(G(fixed_z), out / "samples.png", title="GAN samples (fixed z)")
        real_score = inception_score(clf, x)
        result = {"generated": inception_score(clf, samples), "real_digits": real_score,
                  "scorer": str(scorer), "epochs": epochs}
        save_module(G, out / "generator", "DigitsGenerator")
        (out / "eval.json").write_text(json.dumps(result, indent=2))
        from .plots import plot_run

        plot_run(out)
    D.barrier(info)
    return result
