"""Throughput of `halp` extraction vs a faithful re-implementation of the seeds' per-sample method.

The seeds' method, per sample: (1) `generate` with the decoder hooks already registered (so they also
fire on every decode step), (2) a separate vision-encoder pass for the vision-only feature, (3) a separate
full forward with hooks for the decoder features; batch size 1. halp: one batched prefill inside
`generate` with hooks armed for that pass only, answer decoded from the same cache.

    python benchmarks/bench_extract.py                       # CPU, small random Qwen2.5-VL
    python benchmarks/bench_extract.py --preset 7b --device cuda --dtype bfloat16 --batch-size 16

Prints samples/s of both methods and their ratio, for --max-new-tokens 16 and for --no-generate.
With --preset 7b (random weights, full Qwen2.5-VL-7B shapes; no download), it also prints the fraction
of the card's bf16 peak reached in --no-generate mode, counting 2 x parameters x tokens of matmul work.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from halp.capture import FeatureExtractor, parse_layers
from halp.extract import batches_by_size
from halp.models import adapter_for
from halp.pipeline import BUCKET_BATCHES
from halp.testing import build_checkpoint
from halp.testing.vqa import QUESTIONS

QWEN25_7B_TEXT = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    max_position_embeddings=32768,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
)
QWEN25_7B_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=3584,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Natural-ish random images of 224-448 px on each side, several aspect ratios."""
    rng = np.random.default_rng(seed)
    sides = [224, 280, 336, 392, 448]
    images = []
    for index in range(n):
        width, height = sides[index % 5], sides[(index * 2 + 1) % 5]
        base = rng.integers(0, 255, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        images.append(Image.fromarray(base).resize((width, height), Image.BILINEAR))
    return images


def load(preset: str, device: str, dtype: torch.dtype, workdir: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if preset == "small":
        path = build_checkpoint(
            "qwen2_5_vl",
            workdir / "small",
            hidden_size=256,
            num_layers=8,
            vision_dim=128,
            vision_depth=4,
            min_pixels=224 * 224,
            max_pixels=448 * 448,
        )
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()
        return model, processor
    # 7b: the tiny fixture's tokenizer/processor, the real 7B shapes with random weights.
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    path = build_checkpoint("qwen2_5_vl", workdir / "proc", min_pixels=224 * 224, max_pixels=448 * 448)
    processor = AutoProcessor.from_pretrained(path)
    tiny = Qwen2_5_VLConfig.from_pretrained(path)
    text = {
        **QWEN25_7B_TEXT,
        "bos_token_id": tiny.text_config.bos_token_id,
        "eos_token_id": tiny.text_config.eos_token_id,
        "pad_token_id": tiny.text_config.pad_token_id,
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=QWEN25_7B_VISION,
        image_token_id=tiny.image_token_id,
        video_token_id=tiny.video_token_id,
        vision_start_token_id=tiny.vision_start_token_id,
    )
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.eos_token_id = tiny.text_config.eos_token_id
    return model, processor


def seeds_method(model, processor, adapter, images, questions, layers, max_new_tokens: int) -> None:
    """The seeds' three passes per sample, batch size 1, hooks left on during generate."""
    blocks = adapter.layer_modules()
    for image, question in zip(images, questions, strict=True):
        inputs = processor(text=[adapter.prompt(question)], images=[image], return_tensors="pt").to(model.device)
        outputs: dict[int, torch.Tensor] = {}
        handles = [
            blocks[k].register_forward_hook(
                lambda m, a, o, k=k, outputs=outputs: outputs.__setitem__(
                    k, (o[0] if isinstance(o, tuple) else o).detach()
                )
            )
            for k in layers
        ]
        with torch.no_grad():
            if max_new_tokens:
                model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)  # pass 1
            vision = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])  # pass 2
            _ = vision.last_hidden_state.mean(0).float().cpu()
            model(**inputs)  # pass 3
        for handle in handles:
            handle.remove()
        boundary = int(inputs["image_grid_thw"][0].prod())  # the seeds' (wrong) position, kept for fidelity
        for k in layers:
            state = outputs[k][0]
            _ = state[min(boundary, state.shape[0] - 1)].float().cpu(), state[-1].float().cpu()


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["small", "7b"], default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of the card (H100 SXM)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        model, processor = load(args.preset, args.device, dtype, Path(tmp))
        adapter = adapter_for(model, processor)
        layers = parse_layers("halp", adapter.num_layers)
        extractor = FeatureExtractor(adapter, layers)
        images = make_images(args.samples)
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.samples)]
        encoded = adapter.encode(images, questions)
        text_tokens = float(encoded["attention_mask"].sum()) / args.samples
        patches = float(encoded["image_grid_thw"].prod(-1).sum()) / args.samples
        print(
            f"preset={args.preset} device={args.device} dtype={args.dtype} samples={args.samples} "
            f"batch_size={args.batch_size} layers={layers} threads={torch.get_num_threads()}"
        )

        def run_halp(new_tokens: int) -> None:
            # Windows of BUCKET_BATCHES batches, batched by image size within each (images in memory here;
            # `halp extract` orders by token count, which for these images follows the size). No overlap:
            # benchmarks/bench_pipeline.py measures the overlapped pipeline.
            window = args.batch_size * BUCKET_BATCHES
            for start in range(0, args.samples, window):
                window_images, window_questions = images[start : start + window], questions[start : start + window]
                for chosen in batches_by_size(window_images, args.batch_size):
                    extractor(
                        [window_images[i] for i in chosen],
                        [window_questions[i] for i in chosen],
                        max_new_tokens=new_tokens,
                    )

        # Warm-up (kernels, allocator) on two samples for both methods.
        extractor(images[:2], questions[:2], max_new_tokens=2)
        seeds_method(model, processor, adapter, images[:1], questions[:1], layers, 2)

        results = {}
        for label, new_tokens in ((f"max-new-tokens={args.max_new_tokens}", args.max_new_tokens), ("no-generate", 0)):
            t_halp = timed(lambda n=new_tokens: run_halp(n), args.device)
            t_seeds = timed(
                lambda n=new_tokens: seeds_method(model, processor, adapter, images, questions, layers, n), args.device
            )
            halp_rate, seeds_rate = args.samples / t_halp, args.samples / t_seeds
            results[label] = (halp_rate, seeds_rate)
            print(
                f"{label:>20}: halp {halp_rate:8.2f} samples/s | seeds {seeds_rate:8.2f} samples/s | "
                f"ratio {halp_rate / seeds_rate:5.2f}x"
            )
        if args.device.startswith("cuda"):
            lm_params = sum(p.numel() for p in adapter.layer_modules().parameters())
            vision_params = sum(p.numel() for p in model.model.visual.parameters())
            # Matmul work of the prefill: 2 x weights x tokens for the decoder and for the vision tower.
            flops_per_sample = 2 * (lm_params * text_tokens + vision_params * patches)
            achieved = results["no-generate"][0] * flops_per_sample / 1e12
            print(
                f"no-generate: ~{achieved:.1f} TFLOP/s = {achieved / args.peak_tflops:.1%} of {args.peak_tflops} "
                f"TFLOP/s bf16 peak ({text_tokens:.0f} prompt tokens, {patches:.0f} vision patches per sample)"
            )


if __name__ == "__main__":
    main()
