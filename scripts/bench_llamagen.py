"""Side by side with LlamaGen's own scripts: code extraction and the GPT training step. Prints figures, asserts nothing
except that both sides computed the same thing (codes, first-step losses).

The official code is read from a local checkout named by LLAMAGEN_DIR and is never part of this repository.
Read at FoundationVision/LlamaGen commit ce98ec41803a74a90ce68c40ababa9eaeffeb4ec:
    git clone https://github.com/FoundationVision/LlamaGen /tmp/LlamaGen
    git -C /tmp/LlamaGen checkout ce98ec41803a74a90ce68c40ababa9eaeffeb4ec
    LLAMAGEN_DIR=/tmp/LlamaGen python scripts/bench_llamagen.py extract   # VQ-16, 256px, ten-crop, 64 images
    LLAMAGEN_DIR=/tmp/LlamaGen python scripts/bench_llamagen.py train     # c2i GPT-B, batch 8, fp32 and bf16, EMA
    LLAMAGEN_DIR=/tmp/LlamaGen python scripts/bench_llamagen.py agreement # ours: bf16 vs fp32 codes, digits + VQ-16

extract: `autoregressive/train/extract_codes_c2i.py --ten-crop --debug` (its transforms, DataLoader with batch_size=1,
    `vq_model.encode` per image, two `np.save` per image) against `tokenizer.extract.extract` (what
    scripts/extract_codes.py runs) with views=tencrop, on the same random VQ-16 weights (the official module's own
    initialisation, saved as `{"model": state_dict}`, which our llamagen_vq family reads) and the same ImageFolder of
    random images. The two ten-crops share 8 of 10 views (see tokenizer/data.py): LlamaGen's views 0-3 and 5-8
    are our views 1-4, 7, 6, 9, 8; its zoomed centre (4) and the centre crop of its mirrored image (9) have no
    counterpart (our views 0 and 5 are the plain centre crop and its flip). Codes of the shared views must be identical, and our tokenizer fed LlamaGen's own ten views of the
    first image must give its codes. Our bf16 run (encoder under autocast, code search in float32) is reported
    with its agreement with our float32 codes. Each run is a fresh process (neither side inherits the other's
    allocator state or threads), timed from the call of its loop to its end (imports and start-up excluded).
train: `autoregressive/train/train_c2i.py`'s step (`model(cond_idx, idx, targets)` under autocast, GradScaler,
    clip_grad_norm_ 1.0, fused AdamW with its two weight-decay groups, `update_ema`, `loss.item()`) against our
    step (gpt.train.GPTStep with the Trainer: accelerate autocast, clip, AdamW, schedule, on-device metrics, EMA),
    on the same synthetic codes, both eager (train_c2i.py compiles unless --no-compile; our default is eager). The
    timed steps of each side run in processes of their own, alternating (LlamaGen, ours, ours, LlamaGen, ...).
    Before timing, both start from the same weights (LlamaGen's initialisation, loaded by our gpt loader) with
    every dropout off (LlamaGen's label dropout through its LabelEmbedder's dropout_prob = 0, so its table keeps
    the null-class row) and take two steps on the same batches: the losses must agree. train_c2i.py itself is
    imported for its `creat_optimizer`, with its logging, NCCL set-up and dataset imports served empty stand-ins.

Replaced because they cannot run on a CPU: `device = 'cuda'` -> cpu; `torch.cuda.amp.autocast(dtype)` ->
`torch.autocast('cpu', dtype)`; `torch.cuda.amp.GradScaler(enabled=fp16)` -> `torch.amp.GradScaler('cpu', enabled=False)`
(fp16 is not benchmarked); `init_distributed_mode` / DistributedSampler / DDP over NCCL -> one process, no wrapper
(extraction: the script's own --debug path); `pin_memory=True` -> False; `torch.cuda.synchronize()` (logging only)
-> nothing. The official files are imported by path under private module names, so their `tokenizer` package does
not shadow ours.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder

import make_digits
from gpt.config import GPTConfig
from gpt.loading import load_gpt
from gpt.model import GPT
from gpt.train import CodeDataConfig, GPTStep, TrainConfig
from tokenizer import MGVQ, MGVQConfig, TokenizerRef, VQGANConfig, load_tokenizer
from tokenizer.common.runs import MetricWindow, Trainer, make_optimizer, make_scheduler
from tokenizer.extract import ExtractConfig, ExtractDataConfig, extract
from tokenizer.store import CodeStore

LLAMAGEN_COMMIT = "ce98ec41803a74a90ce68c40ababa9eaeffeb4ec"


def llamagen_file(relpath: str, name: str) -> types.ModuleType:
    """Import LLAMAGEN_DIR/relpath as module `name`."""
    root = os.environ.get("LLAMAGEN_DIR")
    if not root:
        sys.exit(f"set LLAMAGEN_DIR to a checkout of FoundationVision/LlamaGen at {LLAMAGEN_COMMIT} (see --help)")
    path = Path(root) / relpath
    if not path.is_file():
        sys.exit(f"LLAMAGEN_DIR={root} has no {relpath}: expected FoundationVision/LlamaGen at {LLAMAGEN_COMMIT}")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def llamagen_gpt() -> types.ModuleType:
    """autoregressive/models/gpt.py; its `from utils.drop_path import DropPath` is served LlamaGen's utils/drop_path.py."""
    if "utils.drop_path" not in sys.modules:
        sys.modules.setdefault("utils", types.ModuleType("utils"))
        sys.modules["utils"].drop_path = llamagen_file("utils/drop_path.py", "utils.drop_path")
    return llamagen_file("autoregressive/models/gpt.py", "llamagen_gpt")


# ---- extraction ----------------------------------------------------------------------------------------------

def make_image_folder(root: Path, images: int, classes: int = 4, seed: int = 0) -> None:
    """`images` JPEGs of smooth random colour fields (sizes 260-700 px, so ADM's BOX halving runs too)."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        w, h = rng.integers(260, 700, size=2)
        coarse = rng.integers(0, 256, (int(h) // 24 + 2, int(w) // 24 + 2, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((int(w), int(h)), Image.BICUBIC)
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"img{i:04d}.jpg", quality=90)


def llamagen_vq_checkpoint(path: Path, seed: int) -> None:
    """The official VQ-16 with its own random initialisation, saved as the official `{"model": state_dict}`."""
    vq = llamagen_file("tokenizer/tokenizer_image/vq_model.py", "llamagen_vq_model")
    torch.manual_seed(seed)
    model = vq.VQ_models["VQ-16"](codebook_size=16384, codebook_embed_dim=8)
    torch.save({"model": model.state_dict()}, path)


def llamagen_extract(data: Path, ckpt: Path, out: Path, image_size: int, workers: int) -> None:
    """extract_codes_c2i.py's main() with --ten-crop --debug, on the CPU (replacements: see the module docstring)."""
    vq = sys.modules["llamagen_vq_model"]
    center_crop_arr = llamagen_file("dataset/augmentation.py", "llamagen_augmentation").center_crop_arr
    device = "cpu"  # 'cuda'
    os.makedirs(out / f"imagenet{image_size}_codes", exist_ok=True)
    os.makedirs(out / f"imagenet{image_size}_labels", exist_ok=True)
    vq_model = vq.VQ_models["VQ-16"](codebook_size=16384, codebook_embed_dim=8)
    vq_model.to(device)
    vq_model.eval()
    checkpoint = torch.load(ckpt, map_location="cpu")
    vq_model.load_state_dict(checkpoint["model"])
    del checkpoint
    crop_size = int(image_size * 1.1)
    transform = transforms.Compose([
        transforms.Lambda(lambda pil_image: center_crop_arr(pil_image, crop_size)),
        transforms.TenCrop(image_size),
        transforms.Lambda(lambda crops: torch.stack([transforms.ToTensor()(crop) for crop in crops])),
        transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], inplace=True)])
    dataset = ImageFolder(str(data), transform=transform)  # build_dataset(args) for --dataset imagenet
    loader = DataLoader(dataset, batch_size=1, shuffle=False, sampler=None, num_workers=workers,
                        pin_memory=False, drop_last=False)  # pin_memory=True
    total = 0
    for x, y in loader:
        x = x.to(device)
        x_all = x.flatten(0, 1)
        num_aug = 10
        y = y.to(device)
        with torch.no_grad():
            _, _, [_, _, indices] = vq_model.encode(x_all)
        codes = indices.reshape(x.shape[0], num_aug, -1)
        x = codes.detach().cpu().numpy()
        train_steps = 0 + total  # rank + total
        np.save(f"{out}/imagenet{image_size}_codes/{train_steps}.npy", x)
        y = y.detach().cpu().numpy()
        np.save(f"{out}/imagenet{image_size}_labels/{train_steps}.npy", y)
        total += 1
        print(total, end=" " if total % 16 else "\n", flush=True)  # print(total)
    print()


def our_extract(data: Path, ckpt: Path, out: Path, image_size: int, workers: int, batch_size: int,
                precision: str) -> None:
    """tokenizer.extract.extract, as scripts/extract_codes.py calls it, with views=tencrop."""
    AcceleratorState._reset_state(True)
    ref = TokenizerRef(config=VQGANConfig.preset("llamagen-vq16"), checkpoint=str(ckpt), family="llamagen_vq")
    extract(ExtractConfig(data=ExtractDataConfig(root=str(data), image_size=image_size, views="tencrop"),
                          tokenizer=ref, out_dir=str(out), batch_size=batch_size, num_workers=workers,
                          precision=precision))


# LlamaGen's ten-crop view i is our tencrop view SHARED[i] (None: not among ours, see the module docstring).
SHARED = [1, 2, 3, 4, None, 7, 6, 9, 8, None]


def check_codes(official_dir: Path, store_dir: Path, image_size: int) -> str:
    """Compare LlamaGen's per-image files with our store on the shared views; raise on any difference."""
    store = CodeStore(store_dir)
    n = len(store)
    theirs = np.stack([np.load(official_dir / f"imagenet{image_size}_codes/{i}.npy")[0] for i in range(n)])
    labels = np.concatenate([np.load(official_dir / f"imagenet{image_size}_labels/{i}.npy") for i in range(n)])
    ours = np.asarray(store.codes).reshape(n, store.meta["num_views"], -1).astype(np.int64)
    pairs = [(i, j) for i, j in enumerate(SHARED) if j is not None]
    differ = sum(int((theirs[:, i] != ours[:, j]).sum()) for i, j in pairs)
    if differ or not np.array_equal(labels, store.labels):
        raise SystemExit(f"codes differ: {differ} of {n * len(pairs) * theirs.shape[-1]} on the shared views "
                         f"(labels equal: {np.array_equal(labels, store.labels)})")
    shared = theirs[:, [i for i, _ in pairs]]
    return f"codes identical on the {len(pairs)} shared views of {n} images ({shared.size} codes, {len(np.unique(shared))} distinct)"


def check_official_views(data: Path, ckpt: Path, official_dir: Path, image_size: int) -> str:
    """Our tokenizer on LlamaGen's own ten views of the first image gives LlamaGen's codes for all ten."""
    center_crop_arr = sys.modules["llamagen_augmentation"].center_crop_arr
    transform = transforms.Compose([
        transforms.Lambda(lambda im: center_crop_arr(im, int(image_size * 1.1))), transforms.TenCrop(image_size),
        transforms.Lambda(lambda crops: torch.stack([transforms.ToTensor()(c) for c in crops])),
        transforms.Normalize(mean=[0.5] * 3, std=[0.5] * 3, inplace=True)])
    views = ImageFolder(str(data), transform=transform)[0][0]  # (10, 3, S, S)
    model = load_tokenizer(ckpt, VQGANConfig.preset("llamagen-vq16"), "llamagen_vq")
    ours = model.encode_codes(views).reshape(10, -1).numpy()
    theirs = np.load(official_dir / f"imagenet{image_size}_codes/0.npy")[0]
    if not np.array_equal(ours, theirs):
        raise SystemExit(f"our tokenizer on LlamaGen's views of image 0: {(ours != theirs).sum()} codes differ")
    return "our tokenizer on LlamaGen's own 10 views of image 0: codes identical"


def agreement(store_a: Path, store_b: Path) -> float:
    a, b = CodeStore(store_a).codes, CodeStore(store_b).codes
    return float((np.asarray(a) == np.asarray(b)).mean())


def run_side(args: argparse.Namespace, side: str, data: Path, ckpt: Path, out: Path) -> float:
    """One extraction (`side`: "llamagen" or "ours <precision>") in a fresh process, so that neither side inherits
    the other's allocator or thread state; returns the seconds its extraction took (start-up excluded)."""
    cmd = [sys.executable, __file__, "_extract_one", side, str(data), str(ckpt), str(out), "--image-size",
           str(args.image_size), "--workers", str(args.workers), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=child_env())
    if done.returncode:
        raise SystemExit(f"{side} extraction failed (exit {done.returncode}): {done.stdout[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1].split()[-1])


def extract_one(args: argparse.Namespace) -> None:
    """The child of run_side: ours as scripts/extract_codes.py runs, or LlamaGen's loop as its script runs; prints
    the seconds last."""
    data, ckpt, out = Path(args.data), Path(args.ckpt), Path(args.out)
    if args.side == "llamagen":
        llamagen_file("tokenizer/tokenizer_image/vq_model.py", "llamagen_vq_model")
        start = time.perf_counter()
        llamagen_extract(data, ckpt, out, args.image_size, args.workers)
    else:
        start = time.perf_counter()
        our_extract(data, ckpt, out, args.image_size, args.workers, args.batch_size, args.side.split()[1])
    print(f"seconds {time.perf_counter() - start:.3f}")


def bench_extract(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench_llamagen_", dir=args.dir))
    try:
        data, ckpt = tmp / "images", tmp / "vq16_random.pt"
        make_image_folder(data, args.images)
        llamagen_vq_checkpoint(ckpt, args.seed)
        print(f"LlamaGen VQ-16 (random weights, seed {args.seed}), {args.images} images, {args.image_size}px, "
              f"ten-crop (10 views), {args.workers} loader workers, {args.threads or torch.get_num_threads()} torch "
              f"threads, each run in its own process; ours: batch {args.batch_size} images", flush=True)
        names = ["llamagen fp32"] + [f"ours {precision}" for precision in args.precisions]
        seconds = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:  # interleaved: ABC CBA ...
                side = "llamagen" if name.startswith("llamagen") else name
                seconds[name].append(run_side(args, side, data, ckpt, tmp / f"{name.replace(' ', '_')}_{r}"))
                print(f"  round {r} {name}: {seconds[name][-1]:.1f} s, load {os.getloadavg()[0]:.1f}", flush=True)
        failures = []  # a difference is reported after the figures, which are printed either way
        llamagen_file("dataset/augmentation.py", "llamagen_augmentation")
        for check in (lambda: check_codes(tmp / "llamagen_fp32_0", tmp / "ours_fp32_0", args.image_size),
                      lambda: check_official_views(data, ckpt, tmp / "llamagen_fp32_0", args.image_size)):
            try:
                print(check())
            except SystemExit as failed:
                print(failed)
                failures.append(str(failed))
        base = statistics.median(seconds["llamagen fp32"])
        for name, s in seconds.items():
            line = f"{name:>14}: {args.images / statistics.median(s):6.3f} images/s  {base / statistics.median(s):5.2f}x"
            if name.startswith("ours") and name != "ours fp32" and "fp32" in args.precisions:
                share = agreement(tmp / f"{name.replace(' ', '_')}_0", tmp / "ours_fp32_0")
                line += f"  codes equal to fp32: {share:.2%}"
            print(line)
        if failures:
            raise SystemExit("; ".join(failures))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_agreement(args: argparse.Namespace) -> None:
    """bf16 against fp32 extraction (ours, both): the quickstart digits with the digits tokenizer (--digits-tokenizer,
    else random weights), and random-weight LlamaGen VQ-16 at 256px on plain views of random images."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_agreement_", dir=args.dir))
    try:
        make_digits.export(tmp / "digits", size=16)
        digits = args.digits_tokenizer
        if digits is None:
            torch.manual_seed(args.seed)
            digits = tmp / "digits_random.pt"
            torch.save({"model": MGVQ(MGVQConfig.named_presets()["digits"]).state_dict()}, digits)
        make_image_folder(tmp / "images", args.images)
        vq16 = tmp / "vq16_random.pt"
        llamagen_vq_checkpoint(vq16, args.seed)
        cases = [("digits 16px, MGVQ digits " + ("trained" if args.digits_tokenizer else "random"),
                  TokenizerRef(config=MGVQConfig.named_presets()["digits"], checkpoint=str(digits)),
                  tmp / "digits" / "train", 16, 256),
                 (f"LlamaGen VQ-16 random, {args.images} images 256px",
                  TokenizerRef(config=VQGANConfig.preset("llamagen-vq16"), checkpoint=str(vq16), family="llamagen_vq"),
                  tmp / "images", 256, args.batch_size)]
        for name, ref, root, size, batch_size in cases:
            stores = {}
            for precision in ("fp32", "bf16"):
                AcceleratorState._reset_state(True)
                stores[precision] = tmp / f"{root.name}_{precision}"
                start = time.perf_counter()
                extract(ExtractConfig(data=ExtractDataConfig(root=str(root), image_size=size, views="plain"),
                                      tokenizer=ref, out_dir=str(stores[precision]), batch_size=batch_size,
                                      num_workers=0, precision=precision))
                print(f"  {name} {precision}: {time.perf_counter() - start:.1f} s", flush=True)
            codes = np.asarray(CodeStore(stores["fp32"]).codes)
            print(f"{name}: bf16 codes equal to fp32: {agreement(stores['bf16'], stores['fp32']):.2%} of {codes.size} "
                  f"({len(np.unique(codes))} distinct codes in fp32)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- training ------------------------------------------------------------------------------------------------

VOCAB, GRID, CLASSES = 16384, 16, 1000


def llamagen_model(gpt_module: types.ModuleType, dropout: float, seed: int, n_layer: int) -> torch.nn.Module:
    """train_c2i.py's GPT-B, as GPT_models["GPT-B"] builds it but with n_layer free (12: GPT-B), and the script's
    default dropouts (dropout_p 0.1, token_dropout_p 0.1; class_dropout_prob is ModelArgs' 0.1)."""
    torch.manual_seed(seed)
    return gpt_module.Transformer(gpt_module.ModelArgs(
        n_layer=n_layer, n_head=12, dim=768, vocab_size=VOCAB, block_size=GRID ** 2, num_classes=CLASSES, cls_token_num=1, model_type="c2i",
        resid_dropout_p=dropout, ffn_dropout_p=dropout, drop_path_rate=0.0, token_dropout_p=dropout))


class LlamaGenStep:
    """One iteration of train_c2i.py's loop (replacements: see the module docstring); returns the loss."""

    def __init__(self, model: torch.nn.Module, precision: str, ema_module: types.ModuleType):
        train = sys.modules["llamagen_train"]
        self.model, self.update_ema = model, ema_module.update_ema
        self.ema = deepcopy(model)
        ema_module.requires_grad(self.ema, False)
        self.optimizer = train.creat_optimizer(model, 5e-2, 1e-4, (0.9, 0.95), _Quiet())
        self.update_ema(self.ema, model, decay=0)
        model.train()
        self.ema.eval()
        self.ptdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)  # torch.cuda.amp.GradScaler(enabled=fp16)
        self.running_loss = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        z_indices = x.reshape(x.shape[0], -1)
        c_indices = y.reshape(-1)
        with torch.autocast("cpu", dtype=self.ptdtype, enabled=self.ptdtype != torch.float32):
            _, loss = self.model(cond_idx=c_indices, idx=z_indices[:, :-1], targets=z_indices)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.update_ema(self.ema, self.model)
        self.running_loss += loss.item()
        return loss.item()


class _Quiet:
    def info(self, *_):
        pass


class OurStep:
    """gpt.train's step as train() runs it: GPTStep, then the Trainer's EMA update and metric window."""

    def __init__(self, weights: dict, config, precision: str, out_dir: Path, batch_size: int):
        AcceleratorState._reset_state(True)
        cfg = TrainConfig(data=CodeDataConfig(codes_dir="(synthetic)"), model=config, tokenizer=None, out_dir=str(out_dir), precision=precision,
                          ema=0.9999, global_batch_size=batch_size, log_every=10**9, ckpt_every=10**9)
        self.trainer = trainer = Trainer(cfg)
        model = GPT(config)
        model.load_state_dict(weights)
        optimizer = make_optimizer(model, cfg, fused=trainer.fused_optimizer)
        model, optimizer, scheduler = trainer.prepare(model, optimizer, make_scheduler(optimizer, cfg, 10**9))
        model.train()
        self.batch = None
        self.step = GPTStep(trainer, iter(lambda: self.batch, None), model, optimizer, scheduler, 1)
        self.window, self.source = MetricWindow(), trainer.accelerator.unwrap_model(model)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.batch = (x.reshape(x.shape[0], -1, 1), y.reshape(-1))  # (B, L, G=1), (B,)
        metrics = self.step()
        self.window.add(metrics)  # Trainer.run's loop body, without its log and checkpoint branches
        self.trainer.step += 1
        self.trainer.ema.update(self.source)
        return metrics["loss"]


def our_config(dropout: float, n_layer: int):
    return GPTConfig.single_codebook("gpt_b", codes_per_group=VOCAB, grid_size=GRID, n_layer=n_layer,
                                     class_dropout_prob=dropout,
                                     token_dropout_p=dropout, resid_dropout_p=dropout, ffn_dropout_p=dropout)


def our_weights(official: torch.nn.Module, config, tmp: Path) -> dict:
    """LlamaGen's weights through our gpt loader (the official c2i layout, `{"model": state_dict}`)."""
    torch.save({"model": official.state_dict()}, tmp / "llamagen_gpt_b.pt")
    return load_gpt(tmp / "llamagen_gpt_b.pt", config).state_dict()


def synthetic_batches(batch_size: int, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)  # as CustomDataset yields them: codes (B, 1, L), labels (B, 1)
    return [(torch.randint(VOCAB, (batch_size, 1, GRID ** 2), generator=g),
             torch.randint(CLASSES, (batch_size, 1), generator=g)) for _ in range(count)]


def check_losses(gpt_module, ema_module, precision: str, batches, tmp: Path, n_layer: int) -> str:
    """Same weights, dropouts off, the same two batches: both steps' losses must agree."""
    theirs_model = llamagen_model(gpt_module, 0.0, 0, n_layer)
    theirs_model.cls_embedding.dropout_prob = 0.0  # label dropout off (at 0 from the start its table has no null row)
    config = our_config(0.0, n_layer)
    ours = OurStep(our_weights(theirs_model, config, tmp), config, precision, tmp / f"check_{precision}",
                   len(batches[0][0]))
    theirs = LlamaGenStep(theirs_model, precision, ema_module)
    pairs = [(theirs(x, y), float(ours(x, y))) for x, y in batches[:2]]
    if pairs[0][0] != pairs[0][1]:
        raise SystemExit(f"{precision}: first-step losses differ: LlamaGen {pairs[0][0]!r}, ours {pairs[0][1]!r}")
    return (f"{precision}: first-step loss identical ({pairs[0][0]:.6f}); second step LlamaGen {pairs[1][0]:.7f}, "
            f"ours {pairs[1][1]:.7f} (diff {abs(pairs[1][0] - pairs[1][1]):.1e})")


def bench_train(args: argparse.Namespace) -> None:
    gpt_module = llamagen_gpt()
    ema_module = llamagen_file("utils/ema.py", "llamagen_ema")
    llamagen_train_module()
    tmp = Path(tempfile.mkdtemp(prefix="bench_llamagen_train_", dir=args.dir))
    try:
        batches = synthetic_batches(args.batch_size, 4, args.seed)
        tokens = args.batch_size * GRID ** 2
        print(f"c2i GPT-B ({args.n_layer} layers), {VOCAB} codes, {GRID}x{GRID}, batch {args.batch_size} ({tokens} tokens), dropouts 0.1, "
              f"EMA on both sides, eager, {torch.get_num_threads()} torch threads", flush=True)
        for precision in args.precisions:
            seconds = {"llamagen": [], "ours": []}
            for r in range(args.rounds):  # each side in its own process, alternating: LlamaGen ours ours LlamaGen ...
                for side in ("llamagen", "ours") if r % 2 == 0 else ("ours", "llamagen"):
                    seconds[side] += train_side(args, side, precision)
            t_theirs, t_ours = statistics.median(seconds["llamagen"]), statistics.median(seconds["ours"])
            print(f"{precision}: LlamaGen {tokens / t_theirs:,.0f} tokens/s ({t_theirs:.2f} s/step), ours "
                  f"{tokens / t_ours:,.0f} tokens/s ({t_ours:.2f} s/step): {t_theirs / t_ours:.2f}x (medians of "
                  f"{args.rounds} x {args.steps} steps per side, load {os.getloadavg()[0]:.1f})", flush=True)
        # after the timing: the models and optimizer states these build stay in this process's memory
        for precision in args.precisions:
            print(check_losses(gpt_module, ema_module, precision, batches, tmp, args.n_layer), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train_side(args: argparse.Namespace, side: str, precision: str) -> list[float]:
    """`args.steps` timed steps of one side ("llamagen" or "ours") after `args.warmup` untimed ones, in a fresh
    process, as its own script would run them: neither side inherits the other's allocator state or caches."""
    cmd = [sys.executable, __file__, "_train_one", side, precision, "--n-layer", str(args.n_layer), "--batch-size",
           str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps), "--seed", str(args.seed),
           "--threads", str(args.threads)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=child_env())
    if done.returncode:
        raise SystemExit(f"{side} {precision} training steps failed (exit {done.returncode}): {done.stdout[-2000:]}")
    seconds = [float(t) for t in done.stdout.strip().splitlines()[-1].split()[1:]]
    print(f"  {side} {precision}: " + ", ".join(f"{t:.2f}" for t in seconds) + f" s/step, load {os.getloadavg()[0]:.1f}",
          flush=True)
    return seconds


def train_one(args: argparse.Namespace) -> None:
    """The child of train_side: builds the side's model from LlamaGen's initialisation and prints the step times."""
    gpt_module = llamagen_gpt()
    ema_module = llamagen_file("utils/ema.py", "llamagen_ema")
    llamagen_train_module()
    batches = synthetic_batches(args.batch_size, 4, args.seed)
    theirs_model = llamagen_model(gpt_module, 0.1, 0, args.n_layer)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if args.side == "ours":
            config = our_config(0.1, args.n_layer)
            step = OurStep(our_weights(theirs_model, config, Path(tmp)), config, args.precision, Path(tmp) / "run",
                           args.batch_size)
        else:
            step = LlamaGenStep(theirs_model, args.precision, ema_module)
        seconds = []
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            step(*batches[i % len(batches)])
            seconds.append(time.perf_counter() - start)
    print("seconds", *(f"{t:.4f}" for t in seconds[args.warmup:]))


def child_env() -> dict:
    """The environment of a child run of this script: the repository and scripts/ on its path."""
    here = Path(__file__).resolve()
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parents[1]), str(here.parent)])}


def llamagen_train_module() -> types.ModuleType:
    """train_c2i.py itself, for creat_optimizer; its imports of utils.logger / utils.distributed / dataset.build
    are served stand-ins (they set up logging, NCCL and the ImageNet code dataset, none of which the step uses)."""
    for name in ("utils.logger", "utils.distributed", "dataset", "dataset.build", "autoregressive",
                 "autoregressive.models", "autoregressive.models.gpt", "utils.ema"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["utils.logger"].create_logger = None
    sys.modules["utils.distributed"].init_distributed_mode = None
    sys.modules["dataset.build"].build_dataset = None
    sys.modules["autoregressive.models.gpt"].GPT_models = sys.modules["llamagen_gpt"].GPT_models
    sys.modules["utils.ema"].update_ema = sys.modules["llamagen_ema"].update_ema
    sys.modules["utils.ema"].requires_grad = sys.modules["llamagen_ema"].requires_grad
    return llamagen_file("autoregressive/train/train_c2i.py", "llamagen_train")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("extract", help="extract_codes_c2i.py --ten-crop vs scripts/extract_codes.py views=tencrop")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1, help="ours: images per step (x 10 views)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers, both sides (0: in the main process, "
                   "which leaves the 2 cores of the README's machine to the encoder)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"], help="ours")
    p.add_argument("--rounds", type=int, default=1, help="passes over the folder per side, interleaved")
    p.set_defaults(fn=bench_extract)
    p = sub.add_parser("agreement", help="bf16 vs fp32 codes of our extraction: digits, VQ-16 at 256px")
    p.add_argument("--digits-tokenizer", default=None, help="a trained digits tokenizer (random weights when omitted)")
    p.add_argument("--images", type=int, default=8, help="VQ-16 images (plain views)")
    p.add_argument("--batch-size", type=int, default=8, help="VQ-16 images per step (digits: 256)")
    p.set_defaults(fn=bench_agreement)
    p = sub.add_parser("train", help="train_c2i.py's step vs ours, GPT-B")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--n-layer", type=int, default=12, help="12: GPT-B; fewer for a quick check on a slow machine")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="timed steps per process")
    p.add_argument("--rounds", type=int, default=2, help="processes per side, alternating")
    p.set_defaults(fn=bench_train)
    p = sub.add_parser("_train_one", help="(internal) one side of `train`, run in its own process")
    p.add_argument("side", choices=["llamagen", "ours"])
    p.add_argument("precision", choices=["fp32", "bf16"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.set_defaults(fn=train_one)
    p = sub.add_parser("_extract_one", help="(internal) one side of `extract`, run in its own process")
    for name in ("side", "data", "ckpt", "out"):
        p.add_argument(name)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(fn=extract_one)
    for p in sub.choices.values():
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
        p.add_argument("--dir", default=None, help="where the temporary files go (default: the system temp dir)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.fn(args)


if __name__ == "__main__":
    main()
