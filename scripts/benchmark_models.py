"""Training throughput (images/s) of every model config under configs/model/, on this machine.

    uv run python scripts/benchmark_models.py                 # about 5 minutes on 2 cores
    uv run python scripts/benchmark_models.py --device cuda   # GPU (add --channels-last --bf16)

Each config trains with the LightningModule's own network and AdamW on random uint8 images at the
size it is meant for (28x28 grey for the small CNNs, 224 or 384 RGB for the ImageNet models),
a warm-up step, then timed steps for at least `--seconds`. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# config -> (input size, channels, batch on CPU)
SETUPS = {
    "baseline": (28, 1, 128),
    "cnn": (28, 1, 128),
    "cnn4": (28, 1, 128),
    "timm": (224, 3, 16),
    "resnet18_transfer": (224, 3, 16),
    "rexnet_150": (224, 3, 16),
    "efficientnetv2": (224, 3, 16),
    "efficientnet_lite0": (224, 3, 16),
    "swin_224": (224, 3, 8),
    "swin_large_384": (384, 3, 2),
}


def main():
    import torch
    from omegaconf import OmegaConf

    from image_classifier.config import compose_config
    from image_classifier.data.images import Preprocessing
    from image_classifier.models.module import ClassifierModule
    from image_classifier.training.callbacks import FreezeBackbone

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument(
        "--batch-scale", type=int, default=1, help="multiply the CPU batch sizes (GPU: 8)"
    )
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    from image_classifier.lineage import describe_machine, machine_info

    print(f"machine: {describe_machine(machine_info())}", flush=True)
    rows = []
    for name, (size, channels, batch) in SETUPS.items():
        if args.only and name not in args.only:
            continue
        batch *= args.batch_scale
        model_cfg = compose_config(f"model={name}").model
        spec = OmegaConf.to_container(model_cfg, resolve=True)
        spec["pretrained"] = False  # speed does not depend on the weights
        pre = Preprocessing(
            size=(size, size), channels=channels, mean=(0.5,) * channels, std=(0.5,) * channels
        ).to_dict()
        module = ClassifierModule(
            model=spec,
            classes=[str(i) for i in range(10)],
            preprocessing=pre,
            optim={"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0},
        ).to(args.device)
        if spec.get("freeze_backbone"):
            FreezeBackbone().freeze_before_training(module)
        if args.channels_last:
            module = module.to(memory_format=torch.channels_last)
        module.train()
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3) if params else None
        x = torch.randint(
            0, 256, (batch, channels, size, size), dtype=torch.uint8, device=args.device
        )
        y = torch.randint(0, 10, (batch,), device=args.device)

        def step(module=module, x=x, y=y, opt=opt):
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
                loss = torch.nn.functional.cross_entropy(module(x), y)
            if opt is not None:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if args.device == "cuda":
                torch.cuda.synchronize()

        step()
        n, t0 = 0, time.perf_counter()
        while n < 2 or time.perf_counter() - t0 < args.seconds:
            step()
            n += 1
        rate = n * batch / (time.perf_counter() - t0)
        params_m = sum(p.numel() for p in module.parameters()) / 1e6
        rows.append((name, spec["name"], f"{size}x{size}x{channels}", batch, params_m, rate))
        print(f"  {name}: {rate:.1f} img/s", flush=True)
    print(
        f"\nTraining throughput on {args.device} ({torch.get_num_threads()} threads)"
        f"{', channels-last' if args.channels_last else ''}{', bf16' if args.bf16 else ''}:"
    )
    print("| model= | architecture | input | batch | params (M) | train img/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, arch, shape, batch, pm, rate in rows:
        print(f"| {name} | {arch} | {shape} | {batch} | {pm:.1f} | {rate:.1f} |")


if __name__ == "__main__":
    main()
