"""``tallow train classifier``: fine-tunes a BERT / MiniLM sequence
classifier on labelled text and writes a Hugging Face directory that
``tallow.models.load`` reads and ``/v1/classify`` serves.

mode ``head``: the encoder is frozen; its pooled outputs are computed once
with tallow's inference kernels (cached by content hash) and a linear head
is trained on them. The directory holds the head and names its encoder
(config.json ``tallow.base_model`` + ``base_sha256``), or the full weights
with ``save="full"``.
mode ``full``: encoder and head are trained (plain-torch BERT with the
checkpoint's names); the directory holds every weight. With
``train_layers=N`` only the top N encoder layers and the head learn (the
embeddings and the layers below run frozen) and the directory holds just
those, naming its base like a head does. Batches are bucketed by length.

After training, the directory is loaded back as it will be served and run
on the validation set: eval.json reports the largest difference between
the served probabilities and the trainer's, and the accuracy after INT8
quantization.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import distributed as D
from .data import TextExamples, TrainInputError, check_labels, read_labelled, stratified_split
from .trainer import EarlyStopping, Trainer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
MODE_DEFAULTS = {  # lr, epochs, batch size, schedule, warm-up ratio, weight decay
    "head": dict(lr=1e-2, epochs=20, batch_size=64, schedule="cosine", warmup_ratio=0.0, weight_decay=0.01),
    "full": dict(lr=5e-5, epochs=3, batch_size=32, schedule="linear", warmup_ratio=0.1, weight_decay=0.01),
}


def number(value, name: str, *, kind=float, minimum: Optional[float] = None, positive: bool = False):
    """``value`` as ``kind``, or TrainInputError naming the parameter."""
    try:
        v = kind(value)
    except (TypeError, ValueError):
        raise TrainInputError(f"--{name.replace('_', '-')} must be a number, got {value!r}", param=name) from None
    if kind is float and not math.isfinite(v):
        raise TrainInputError(f"--{name.replace('_', '-')} must be finite, got {value!r}", param=name)
    if positive and v <= 0:
        raise TrainInputError(f"--{name.replace('_', '-')} must be > 0, got {value!r}", param=name)
    if minimum is not None and v < minimum:
        raise TrainInputError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value!r}", param=name)
    return v


def resolve_base(base) -> Path:
    from ..models import CheckpointError, resolve_model_path
    from ..models._checkpoint import read_config

    if base is None or str(base) == "":
        raise TrainInputError("--base is required (a BERT directory, or tallow:minilm)", param="base")
    try:
        p = resolve_model_path(base)
    except CheckpointError as exc:
        raise TrainInputError(f"--base: {exc}", param="base") from exc
    if not p.exists():
        raise TrainInputError(f"--base: {str(base)!r} does not exist (a local BERT directory; nothing is "
                              "downloaded)", param="base")
    try:
        cfg = read_config(p)
    except CheckpointError as exc:
        raise TrainInputError(f"--base: {exc}", param="base") from exc
    if cfg.get("model_type") != "bert":
        raise TrainInputError(f"--base: {str(p)!r} is a {cfg.get('model_type')!r} model, expected a BERT",
                              param="base")
    if not (p / "tokenizer.json").is_file():
        raise TrainInputError(f"--base: {str(p)!r} has no tokenizer.json", param="base")
    return p


class _TokenData(torch.utils.data.Dataset):
    def __init__(self, ids: list[list[int]], labels: torch.Tensor):
        self.ids, self.labels = ids, labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i], int(self.labels[i])


def _pad_collate(pad_id: int):
    def collate(items):
        longest = max(len(x) for x, _ in items)
        ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for r, (x, _) in enumerate(items):
            ids[r, :len(x)] = torch.tensor(x)
            mask[r, :len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask}, torch.tensor([y for _, y in items])
    return collate


def _gather_probs(probs: torch.Tensor, n: int, info) -> torch.Tensor:
    """Reassembles the shards of ``shard_indices`` (rank r holds r, r+W, ...)."""
    parts = D.gather_objects(probs, info)
    if len(parts) == 1:
        return parts[0]
    out = torch.empty(n, probs.shape[1])
    for r, p in enumerate(parts):
        out[r::info.world_size] = p
    return out


def fit_classifier(train: TextExamples, val: Optional[TextExamples], *, base, out: str | Path,
                   mode: str = "head", pooling: str = "mean", normalize: bool = False,
                   lr=None, epochs=None, batch_size=None, schedule=None, warmup_ratio=None, weight_decay=None,
                   optimizer: str = "adamw", grad_accum: int = 1, seed: int = 0, max_length: int = 128,
                   dropout: float = 0.1, save: Optional[str] = None, checkpoint_every: int = 0,
                   keep_last: int = 2, resume: Optional[str] = None, live: Optional[bool] = None,
                   early_stopping: Optional[EarlyStopping] = None, cache_dir=None, served_check: bool = True,
                   int8_check: bool = True, copy_tokenizer: bool = True, log_every: int = 50,
                   restore_best: bool = False, train_layers: Optional[int] = None,
                   run_info: Optional[dict] = None, log=print) -> dict:
    """Checks everything, trains, exports, evaluates the exported model.
    Returns eval.json's content."""
    from ..models import load
    from ..models.bert import POOLINGS
    from ..models._checkpoint import read_config, read_state_dict, weights_sha256
    from ..models.bert import BertConfig

    if mode not in MODE_DEFAULTS:
        raise TrainInputError(f"--mode must be 'head' or 'full', got {mode!r}", param="mode")
    if pooling not in POOLINGS:
        raise TrainInputError(f"--pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}", param="pooling")
    if train_layers is not None and mode != "full":
        raise TrainInputError("--train-layers needs --mode full", param="train_layers")
    save = save or ("head" if mode == "head" else "trained" if train_layers is not None else "full")
    if save not in ("head", "full", "trained") or (mode == "full" and save == "head") \
            or (save == "trained" and train_layers is None):
        raise TrainInputError(f"--save must be 'head' (mode head), 'trained' (with --train-layers) or 'full', "
                              f"got {save!r}", param="save")
    d = MODE_DEFAULTS[mode]
    lr = number(d["lr"] if lr is None else lr, "lr", positive=True)
    epochs = number(d["epochs"] if epochs is None else epochs, "epochs", kind=int, minimum=1)
    batch_size = number(d["batch_size"] if batch_size is None else batch_size, "batch_size", kind=int, minimum=1)
    schedule = d["schedule"] if schedule is None else schedule
    warmup_ratio = number(d["warmup_ratio"] if warmup_ratio is None else warmup_ratio, "warmup_ratio", minimum=0)
    weight_decay = number(d["weight_decay"] if weight_decay is None else weight_decay, "weight_decay", minimum=0)
    grad_accum = number(grad_accum, "grad_accum", kind=int, minimum=1)
    max_length = number(max_length, "max_length", kind=int, minimum=2)
    if schedule not in ("constant", "linear", "cosine"):
        raise TrainInputError(f"--schedule must be constant, linear or cosine, got {schedule!r}", param="schedule")
    if optimizer not in ("adamw", "sgd"):
        raise TrainInputError(f"--optimizer must be adamw or sgd, got {optimizer!r}", param="optimizer")
    base_dir = resolve_base(base)
    if len(train) == 0:
        raise TrainInputError("--train holds no examples", param="train")
    labels = check_labels(train, val)
    if val is None:
        raise TrainInputError("no validation set: give --val or --val-fraction", param="val")
    label2id = {y: i for i, y in enumerate(labels)}
    y_train = torch.tensor([label2id[y] for y in train.labels])
    y_val = torch.tensor([label2id[y] for y in val.labels])
    info = D.setup()
    out = Path(out)
    base_raw = read_config(base_dir)
    cfg = BertConfig.from_dict(base_raw)
    if train_layers is not None:
        train_layers = number(train_layers, "train_layers", kind=int, minimum=1)
        if train_layers > cfg.num_hidden_layers:
            raise TrainInputError(f"--train-layers: the base has {cfg.num_hidden_layers} layers, got {train_layers}",
                                  param="train_layers")
    run_info = {**(run_info or {}), "task": "classifier", "mode": mode, "pooling": pooling, "normalize": normalize,
                "base": str(base), "base_dir": str(base_dir), "labels": labels,
                "train": {"source": train.source, "n": len(train), "sha256": train.sha256()},
                "val": {"source": val.source, "n": len(val), "sha256": val.sha256()},
                "hyper": {"lr": lr, "epochs": epochs, "batch_size": batch_size, "schedule": schedule,
                          "warmup_ratio": warmup_ratio, "weight_decay": weight_decay, "optimizer": optimizer,
                          "grad_accum": grad_accum, "seed": seed, "max_length": max_length, "dropout": dropout,
                          "train_layers": train_layers}}
    t_start = time.perf_counter()
    embedder = None
    if mode == "head":
        embedder = load(base_dir, task="embed")
        sha = weights_sha256(base_dir)
        cache = cache_dir if cache_dir is not None else out / "cache"
        # every rank computes its own copy (cached on disk for the next run)
        f_train = _features(embedder, train.texts, pooling, normalize, cache, sha, max_length, log)
        f_val = _features(embedder, val.texts, pooling, normalize, cache, sha, max_length, log)
        train_ds = torch.utils.data.TensorDataset(f_train, y_train)
        val_ds = torch.utils.data.TensorDataset(f_val, y_val)
        torch.manual_seed(seed)
        model = torch.nn.Linear(cfg.hidden_size, len(labels))
        collate, lengths = None, None
    else:
        from ..models.tokenizer import Tokenizer
        from .bert_train import BertForClassificationTrain

        tok = Tokenizer(base_dir, max_length=min(max_length, cfg.max_position_embeddings))
        train_ds = _TokenData(tok.encode_ids(train.texts, truncation=True), y_train)
        val_ds = _TokenData(tok.encode_ids(val.texts, truncation=True), y_val)
        torch.manual_seed(seed)
        model = BertForClassificationTrain(cfg, len(labels), pooling=pooling, normalize=normalize, dropout=dropout)
        model.load_encoder(read_state_dict(base_dir))
        lengths = [len(x) for x in train_ds.ids]  # batches bucketed by length: far less padding
        if train_layers is not None:
            model.bert.freeze_below(cfg.num_hidden_layers - train_layers)
        collate = _pad_collate(tok.pad_id)
    run_info["features_s"] = round(time.perf_counter() - t_start, 2)
    trainer = Trainer(model, train_ds, val_data=val_ds, out_dir=out, num_classes=len(labels), label_names=labels,
                      optimizer=optimizer, lr=lr, weight_decay=weight_decay, schedule=schedule,
                      warmup_ratio=warmup_ratio, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
                      collate_fn=collate, seed=seed, checkpoint_every=checkpoint_every, keep_last=keep_last,
                      best_metric="val_accuracy", early_stopping=early_stopping, resume=resume, live=live,
                      restore_best=restore_best, lengths=lengths,
                      log_every=log_every, run_info=run_info, eval_batch_size=256 if mode == "head" else 64)
    result = trainer.fit()
    counts, probs = trainer.evaluate(probabilities=True)
    probs = _gather_probs(probs, len(val_ds), info)
    if info.is_main:
        export_classifier(model, out, base_dir=base_dir, base_arg=str(base), base_raw=base_raw, labels=labels,
                          mode=mode, save=save, pooling=pooling, normalize=normalize,
                          copy_tokenizer=copy_tokenizer)
        if served_check:
            result["served"] = _served_eval(out, val, y_val, probs, int8_check, max_length, log)
        result["trainer_seconds"] = round(time.perf_counter() - t_start, 2)
        (out / "eval.json").write_text(json.dumps(result, indent=2))
    D.barrier(info)
    return result


def _features(embedder, texts, pooling, normalize, cache, sha, max_length, log):
    from .features import pooled_features

    # truncated as the server does with "truncate": the tokenizer keeps [CLS] ... [SEP]
    tok = embedder.tokenizer
    old = tok.max_length
    tok.max_length = min(old, max_length)
    try:
        return pooled_features(embedder, texts, pooling=pooling, normalize=normalize, cache_dir=cache,
                               base_sha=f"{sha}|{tok.max_length}", log=log)
    finally:
        tok.max_length = old


def export_classifier(model, out: Path, *, base_dir: Path, base_arg: str, base_raw: dict, labels: Sequence[str],
                      mode: str, save: str, pooling: str, normalize: bool, copy_tokenizer: bool = True) -> Path:
    """Writes config.json + model.safetensors (+ tokenizer files) into ``out``."""
    from safetensors.torch import save_file

    from ..models._checkpoint import read_state_dict, weights_sha256

    out.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in base_raw.items() if not k.startswith("_") and k not in ("architectures", "id2label",
                                                                                      "label2id")}
    cfg["architectures"] = ["BertForSequenceClassification"]
    cfg["id2label"] = {str(i): y for i, y in enumerate(labels)}
    cfg["label2id"] = {y: i for i, y in enumerate(labels)}
    tallow = {"pooling": pooling, "normalize": normalize, "trained_with": f"tallow.train (mode {mode})"}
    if save in ("head", "trained"):  # the file holds what was trained; the encoder's other weights come from base
        tallow["base_model"] = base_arg if base_arg.startswith("tallow:") else str(Path(base_dir).resolve())
        tallow["base_sha256"] = weights_sha256(base_dir)
    if mode == "head":
        head = {"classifier.weight": model.weight.detach().clone().contiguous(),
                "classifier.bias": model.bias.detach().clone().contiguous()}
        if save == "head":
            tensors = head
        else:
            enc = {("bert." + k if not k.startswith("bert.") else k): v.contiguous()
                   for k, v in read_state_dict(base_dir).items()
                   if not k.endswith("position_ids") and not k.split(".")[-2:-1] == ["classifier"]}
            tensors = {**enc, **head}
    elif save == "trained":
        tensors = {k: p.detach().clone().contiguous() for k, p in model.named_parameters()
                   if p.requires_grad and not k.startswith("bert.pooler.")}
    else:
        tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    cfg["tallow"] = tallow
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if copy_tokenizer:
        for name in TOKENIZER_FILES:
            if (base_dir / name).is_file():
                shutil.copy(base_dir / name, out / name)
    return out


def store_float16(model_dir: Path) -> None:
    """Rewrites the weights in float16 (half the size on disk; ``load`` runs
    them in float32)."""
    from safetensors.torch import load_file, save_file

    f = model_dir / "model.safetensors"
    sd = {k: v.half().contiguous() if v.is_floating_point() else v for k, v in load_file(str(f)).items()}
    save_file(sd, str(f), metadata={"format": "pt"})


def _served_eval(out: Path, val: TextExamples, y_val: torch.Tensor, trainer_probs: torch.Tensor,
                 int8: bool, max_length: int, log) -> dict:
    """The exported directory loaded as the server loads it, on the validation texts."""
    from ..models import load

    res = {}
    for quant in ([None, "int8"] if int8 else [None]):
        t0 = time.perf_counter()
        model = load(out, quantize=quant)
        ids = model.tokenizer.encode_ids(val.texts, truncation=True, max_length=max_length)
        probs = torch.empty(len(ids), model.num_labels)
        step = 2048
        for i in range(0, len(ids), step):
            rows = model.classify_ids(ids[i:i + step], batch_size=64)
            probs[i:i + len(rows)] = torch.tensor([[r["probabilities"][model.label(j)]
                                                    for j in range(model.num_labels)] for r in rows])
        acc = float((probs.argmax(1) == y_val).double().mean())
        key = "int8" if quant else "fp32"
        res[key] = {"accuracy": acc, "seconds": round(time.perf_counter() - t0, 2)}
        if quant is None:
            res[key]["max_abs_diff_vs_trainer"] = float((probs - trainer_probs).abs().max())
        log(f"served {key}: accuracy {acc:.4f}" + (f", max |p_served - p_trainer| "
                                                    f"{res[key]['max_abs_diff_vs_trainer']:.2e}" if quant is None else ""))
    if "int8" in res:
        res["int8"]["accuracy_change"] = res["int8"]["accuracy"] - res["fp32"]["accuracy"]
    return res


def train_classifier(*, train_path, val_path=None, val_fraction: float = 0.2, text_column: str = "text",
                     label_column: str = "label", seed: int = 0, **kw) -> dict:
    """Reads --train (and --val, or holds out a seeded stratified fraction) and fits."""
    lr = kw.get("lr")
    if lr is not None:
        number(lr, "lr", positive=True)  # before reading any file: a typo fails at once
    resolve_base(kw.get("base"))
    train = read_labelled(train_path, text_column=text_column, label_column=label_column, param="train")
    if val_path:
        val = read_labelled(val_path, text_column=text_column, label_column=label_column, param="val")
        check_labels(train, val)
        split = {"val": str(val_path)}
    else:
        check_labels(train, None)
        tr, ho = stratified_split(train.labels, number(val_fraction, "val_fraction"), seed)
        train, val = train.subset(tr), train.subset(ho)
        split = {"held_out_fraction": val_fraction, "seed": seed, "method": "stratified by label, random.Random(seed)"}
    return fit_classifier(train, val, seed=seed, run_info={"split": split}, **kw)
