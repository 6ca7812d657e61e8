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


# GPU benchmarks (benchmarks/bench_gpu.py): sequence lengths swept for
# attention (GPT-2's heads and head dim, L up to 8192), the token counts M
# for the INT8 linear layers, and the image batch for preprocessing.
GPU_ATTENTION_LENGTHS = (512, 1024, 2048, 4096, 8192)
GPU_ATTENTION_TOKENS = 16384  # B = tokens // L sequences per case
GPU_LINEAR_M = (1, 128, 1024, 4096)
GPU_PREPROCESS_BATCH = 64
GPU_PREPROCESS_SIZES = ((768, 1024), (1024, 768), (480, 640), (1080, 1920), (500, 375), (2000, 1500))


def attention_shapes_gpu(model: dict) -> list[tuple[int, int, int, int]]:
    """(B, H, L, D) for the GPU attention sweep: the model's heads and head
    dim, L from GPU_ATTENTION_LENGTHS, B so that B * L = GPU_ATTENTION_TOKENS."""
    return [(max(1, GPU_ATTENTION_TOKENS // l), model["heads"], l, model["head_dim"])
            for l in GPU_ATTENTION_LENGTHS]
