"""Model shapes the benchmarks take their cases from (no hard-coded shapes in
the bench scripts). Values are the published architectures."""

BERT_BASE = {"name": "bert-base", "hidden": 768, "heads": 12, "head_dim": 64, "ffn": 3072,
             "layers": 12, "seq": 128, "max_seq": 512, "vocab": 30522}
GPT2_124M = {"name": "gpt2-124m", "hidden": 768, "heads": 12, "head_dim": 64, "ffn": 3072,
             "layers": 12, "vocab": 50257, "ctx": 1024}
RESNET50 = {"name": "resnet50", "resize": 256, "crop": 224, "features": 2048, "classes": 1000}

MODELS = {m["name"]: m for m in (BERT_BASE, GPT2_124M, RESNET50)}


def linear_shapes(model: dict) -> list[tuple[int, int]]:
    """(K, N) of the distinct linear layers of a transformer: in -> out features."""
    h, f = model["hidden"], model["ffn"]
    shapes = [(h, h), (h, f), (f, h)]
    if "vocab" in model and model["name"].startswith("gpt2"):
        shapes.append((h, model["vocab"]))  # the LM head
    return shapes
