"""gFID / IS / precision / recall / KID of sample images against a reference, through torch-fidelity.

The numbers follow the ADM evaluator's conventions (DESIGN.md 5): Inception-v3 features from the TF
2015-12-05 graph (torch-fidelity's `inception-v3-compat`), FID against ADM's stored `mu`/`sigma` when the
reference carries them, IS over contiguous unshuffled splits of 5000, precision/recall on pool features.
Nothing downloads: the Inception weights come from a local file, and a missing file fails at once.
"""
import contextlib
import hashlib
import json
import os
import socket
import struct
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.utils import create_feature_extractor
from tqdm import tqdm

from tokenizer.common.io import atomic_path, sha256_file, write_json_atomic

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)
INCEPTION_WEIGHTS_ENV = "MGVQ_INCEPTION_WEIGHTS"
FEATURE_EXTRACTOR = "inception-v3-compat"
POOL, LOGITS = "2048", "logits_unbiased"  # FID/KID/PRC features; IS logits without the fc bias, as ADM
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
ADM_IS_SPLIT_SIZE = 5000


@dataclass
class EvalConfig:
    samples: str  # .npz (arr_0 uint8 (N,H,W,3)) or a folder of images
    reference: str  # ADM reference .npz (mu, sigma, arr_0), any .npz with arr_0, or a folder of images
    out: str | None = None  # metrics JSON; None: <samples without .npz>.metrics.json beside the samples
    inception_weights: str | None = None  # None: $MGVQ_INCEPTION_WEIGHTS, then torch hub's checkpoints dir
    cache_root: str | None = None  # reference features; None: $XDG_CACHE_HOME/mgvq-gpt/fidelity
    device: str = "auto"  # auto: cuda when available
    batch_size: int = 64
    num_workers: int = 0  # DataLoader workers reading the images
    fid: bool = True
    isc: bool = True
    prc: bool = True
    kid: bool = False
    isc_splits: int = 0  # 0: ADM's rule, N // 5000 contiguous splits (at least 1)
    prc_neighborhood: int = 3
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    seed: int = 2020  # KID subset draws
    progress: bool = True


def _npz_member(path: Path, name: str) -> np.ndarray:
    """Memory-map member `name` of an uncompressed .npz; a compressed member is read into RAM."""
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(name + ".npy")
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not an .npz file: {e}") from None
    except KeyError:
        raise KeyError(f"{path} has no array {name!r}") from None
    if info.compress_type != zipfile.ZIP_STORED:
        warnings.warn(f"{path}:{name} is compressed and cannot be memory-mapped; reading it into RAM "
                      f"(write it with np.savez, not np.savez_compressed, to stream it)", stacklevel=2)
        with np.load(path) as npz:
            return npz[name]
    with open(path, "rb") as f:
        # the member's data follows its local header: 30 fixed bytes, the file name, an extra field
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"{path}: corrupt zip header for {name}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}:{name} holds Python objects, not an image array")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")


def npz_members(path: str | os.PathLike) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        return [n.removesuffix(".npy") for n in zf.namelist()]


class NpzImages(Dataset):
    """ADM sample file `arr_0` uint8 (N,H,W,3), streamed from disk; yields uint8 (3,H,W) tensors."""

    def __init__(self, path: str | os.PathLike, key: str = "arr_0"):
        self.path, self.key = Path(path), key
        self._array = _npz_member(self.path, key)
        if self._array.dtype != np.uint8 or self._array.ndim != 4 or self._array.shape[-1] != 3:
            raise ValueError(f"{path}:{key} must be uint8 (N,H,W,3) images, got {self._array.dtype} "
                             f"{tuple(self._array.shape)}")

    def __len__(self) -> int:
        return self._array.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self._array[i].transpose(2, 0, 1)))  # (3, H, W)

    def __getstate__(self):
        # DataLoader workers re-open the map instead of pickling (i.e. copying) the whole array
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._array = _npz_member(self.path, self.key)


class FolderImages(Dataset):
    """Every image file under a folder (recursively, sorted); all must have one size. Yields uint8 (3,H,W)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        with Image.open(self.files[0]) as im:
            self.size = im.size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as im:
            if im.size != self.size:
                raise ValueError(f"{self.files[i]} is {im.size[0]}x{im.size[1]} but {self.files[0]} is "
                                 f"{self.size[0]}x{self.size[1]}: resize the folder to one size first")
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def open_images(path: str | os.PathLike) -> Dataset:
    path = Path(path)
    if path.is_dir():
        return FolderImages(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such sample file or image folder: {path}")
    return NpzImages(path)


def sha256_images(path: str | os.PathLike, progress: bool = False) -> str:
    """Content hash of an .npz file or an image folder (relative names and bytes of every image)."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path, progress=progress)
    h = hashlib.sha256()
    for f in tqdm(FolderImages(path).files, desc=f"sha256 {path.name}/", unit="file", disable=not progress,
                  leave=False):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def resolve_inception_weights(path: str | None = None) -> Path:
    """The Inception weights file: `path`, else $MGVQ_INCEPTION_WEIGHTS, else torch hub's checkpoints dir.

    Checked here so torch-fidelity never falls back to downloading (which can hang without a network).
    """
    if path is None:
        path = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if path is None:
        path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {path}. The evaluation needs torch-fidelity's "
            f"{INCEPTION_WEIGHTS_FILE} (from {INCEPTION_WEIGHTS_URL}); nothing is downloaded at run time. "
            f"Put the file at {Path(torch.hub.get_dir()) / 'checkpoints' / INCEPTION_WEIGHTS_FILE}, or point "
            f"inception_weights=... or ${INCEPTION_WEIGHTS_ENV} at it.")
    return path


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """Second guard: any network call that slips through fails after `seconds` instead of hanging."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


@contextlib.contextmanager
def _exact_float32_convs():
    """cuDNN runs float32 convolutions in TF32 (10-bit mantissa) by default, which shifts the features."""
    conv = torch.backends.cudnn.conv
    previous = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = previous


@dataclass
class Reference:
    """What the metrics need from the reference: pool features (PRC, KID, FID) and/or stored FID stats."""
    pool: torch.Tensor | None  # (N_ref, 2048) float32
    stats: dict | None  # ADM's {"mu": (2048,) float32, "sigma": (2048, 2048) float64}
    sha256: str

    @property
    def num_images(self) -> int:
        return 0 if self.pool is None else self.pool.shape[0]


def adm_stats(path: str | os.PathLike) -> dict | None:
    """ADM reference statistics stored in an .npz (`mu`, `sigma`), in torch-fidelity's dtypes."""
    path = Path(path)
    if path.is_dir() or not {"mu", "sigma"} <= set(npz_members(path)):
        return None
    with np.load(path) as npz:
        mu, sigma = npz["mu"], npz["sigma"]
    if mu.shape != (2048,) or sigma.shape != (2048, 2048):
        raise ValueError(f"{path}: mu/sigma must be (2048,) and (2048, 2048) Inception pool statistics, "
                         f"got {mu.shape} and {sigma.shape}")
    # torch-fidelity's own statistics are float32 means (of float32 features) and float64 covariances
    # (np.cov), and fid_statistics_to_metric insists both sides share those dtypes
    return {"mu": mu.astype(np.float32), "sigma": sigma.astype(np.float64)}


def reference_has_images(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() or "arr_0" in npz_members(path)


def reference_cache_key(reference_sha256: str, weights_sha256: str) -> str:
    """Names the cached reference features by everything they depend on: data, weights, extractor code."""
    return (f"ref-{reference_sha256[:16]}-w{weights_sha256[:16]}-{FEATURE_EXTRACTOR}-{POOL}"
            f"-tf{torch_fidelity.__version__}")


def adm_isc_splits(num_samples: int) -> int:
    """ADM scores IS over contiguous chunks of 5000 samples: 10 splits for 50k."""
    return max(1, num_samples // ADM_IS_SPLIT_SIZE)


def check_sizes(cfg: EvalConfig, num_samples: int, num_reference: int | None) -> None:
    """Fail before the long extraction on sizes torch-fidelity rejects late or turns into NaN silently."""
    problems = []
    if cfg.fid and num_samples < 2:
        problems.append(f"FID needs at least 2 samples, got {num_samples}")
    if cfg.isc and cfg.isc_splits > num_samples:
        problems.append(f"isc_splits={cfg.isc_splits} exceeds the {num_samples} samples (IS would be NaN)")
    for name, n in (("samples", num_samples), ("reference images", num_reference)):
        if n is None:
            continue
        if cfg.prc and n <= cfg.prc_neighborhood:
            problems.append(f"precision/recall with prc_neighborhood={cfg.prc_neighborhood} need more than "
                            f"{cfg.prc_neighborhood} {name}, got {n}")
        if cfg.kid and n < cfg.kid_subset_size:
            problems.append(f"kid_subset_size={cfg.kid_subset_size} exceeds the {n} {name}")
    if problems:
        raise ValueError("; ".join(problems))


def compute_metrics(cfg: EvalConfig, feats: dict[str, torch.Tensor], ref: Reference | None) -> dict[str, float]:
    """The metrics `cfg` asks for, from sample features and the reference (pure computation, seconds)."""
    out = {}
    pool = feats[POOL]  # (N, 2048)
    if cfg.fid:
        ref_stats = ref.stats if ref.stats is not None else fid_features_to_statistics(ref.pool)
        fid = fid_statistics_to_metric(fid_features_to_statistics(pool), ref_stats, verbose=False)
        out["fid"] = fid[torch_fidelity.KEY_METRIC_FID]
    if cfg.isc:
        splits = cfg.isc_splits or adm_isc_splits(len(feats[LOGITS]))
        isc = isc_features_to_metric(feats[LOGITS], splits=splits, shuffle=False)
        out["inception_score"] = isc[torch_fidelity.KEY_METRIC_ISC_MEAN]
        out["inception_score_std"] = isc[torch_fidelity.KEY_METRIC_ISC_STD]
    if cfg.prc:
        # chunked distances (save_cpu_ram): the full-matrix path needs tens of GB at 50k
        prc = prc_features_to_metric(pool, ref.pool, prc_neighborhood=cfg.prc_neighborhood, save_cpu_ram=True,
                                     verbose=False)
        out["precision"] = prc[torch_fidelity.KEY_METRIC_PRECISION]
        out["recall"] = prc[torch_fidelity.KEY_METRIC_RECALL]
    if cfg.kid:
        kid = kid_features_to_metric(pool, ref.pool, kid_subsets=cfg.kid_subsets,
                                     kid_subset_size=cfg.kid_subset_size, rng_seed=cfg.seed, verbose=False)
        out["kid"] = kid[torch_fidelity.KEY_METRIC_KID_MEAN]
        out["kid_std"] = kid[torch_fidelity.KEY_METRIC_KID_STD]
    return out


def _default_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "mgvq-gpt" / "fidelity"


class Evaluator:
    """Inception features through torch-fidelity's extractor, and every metric from them."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.weights = resolve_inception_weights(cfg.inception_weights)
        self.weights_sha256 = sha256_file(self.weights)
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                                   else "cpu" if cfg.device == "auto" else cfg.device)
        self.cache_root = Path(cfg.cache_root).expanduser() if cfg.cache_root else _default_cache_root()
        self._references: dict[tuple[str, bool], Reference] = {}
        layers = [POOL, LOGITS] if cfg.isc else [POOL]
        with _socket_timeout(60):
            extractor = create_feature_extractor(FEATURE_EXTRACTOR, layers, cuda=False, verbose=False,
                                                 feature_extractor_weights_path=str(self.weights))
        self.extractor = extractor.to(self.device)

    @torch.no_grad()
    def features(self, images: Dataset, desc: str = "inception") -> dict[str, torch.Tensor]:
        """Features of every image, in order: {"2048": (N, 2048), "logits_unbiased": (N, 1008)} float32."""
        cuda = self.device.type == "cuda"
        loader = DataLoader(images, batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers,
                            pin_memory=cuda)
        out = {name: [] for name in self.extractor.get_requested_features_list()}
        with tqdm(total=len(images), unit="img", desc=desc, disable=not self.cfg.progress) as bar, \
                _exact_float32_convs():
            for batch in loader:  # (B, 3, H, W) uint8
                feats = self.extractor(batch.to(self.device, non_blocking=cuda))
                for name, f in self.extractor.convert_features_tuple_to_dict(feats).items():
                    out[name].append(f.cpu())
                bar.update(batch.shape[0])
        return {name: torch.cat(fs) for name, fs in out.items()}

    def reference(self, path: str | os.PathLike, stats: dict | None, need_images: bool) -> Reference:
        """The reference, memoised: a sweep scores many sample sets against one."""
        key = (str(path), need_images)
        if key not in self._references:
            self._references[key] = self._load_reference(path, stats, need_images)
        return self._references[key]

    def _load_reference(self, path: str | os.PathLike, stats: dict | None, need_images: bool) -> Reference:
        """Pool features of the reference images when needed, cached on disk (see reference_cache_key)."""
        sha = sha256_images(path, self.cfg.progress)
        if not need_images:
            return Reference(pool=None, stats=stats, sha256=sha)
        cache = self.cache_root / (reference_cache_key(sha, self.weights_sha256) + ".pt")
        if cache.is_file():
            return Reference(pool=torch.load(cache, weights_only=True)["pool"], stats=stats, sha256=sha)
        pool = self.features(open_images(path), desc="inception (reference)")[POOL]
        with atomic_path(cache) as tmp:
            torch.save({"pool": pool, "reference": str(path), "reference_sha256": sha,
                        "weights_sha256": self.weights_sha256}, tmp)
        return Reference(pool=pool, stats=stats, sha256=sha)

    def evaluate(self, samples: str | os.PathLike, reference: str | os.PathLike) -> dict:
        """Metrics of a sample file or folder against a reference, with every setting that produced them."""
        cfg = self.cfg
        if not (cfg.fid or cfg.isc or cfg.prc or cfg.kid):
            raise ValueError("no metric requested: set at least one of fid, isc, prc, kid")
        images = open_images(samples)
        if not Path(reference).exists():
            raise FileNotFoundError(f"no such reference file or image folder: {reference}")
        stats = adm_stats(reference)
        need_ref_images = cfg.prc or cfg.kid or (cfg.fid and stats is None)
        if need_ref_images and not reference_has_images(reference):
            raise ValueError(f"{reference} holds no images (arr_0), only statistics: precision, recall and KID "
                             f"need the reference images (set prc=false kid=false)")
        check_sizes(cfg, len(images), len(open_images(reference)) if need_ref_images else None)
        ref = self.reference(reference, stats, need_ref_images)
        feats = self.features(images, desc="inception (samples)")
        settings = asdict(cfg) | {
            "samples": str(samples), "reference": str(reference),
            "num_samples": len(images), "num_reference_images": ref.num_images,
            "fid_reference": "stored mu/sigma" if ref.stats is not None else "reference images",
            "isc_splits": cfg.isc_splits or adm_isc_splits(len(images)), "isc_shuffle": False,
            "reference_sha256": ref.sha256, "inception_weights": str(self.weights),
            "inception_weights_sha256": self.weights_sha256, "feature_extractor": FEATURE_EXTRACTOR,
            "torch_fidelity": torch_fidelity.__version__, "device": str(self.device),
        }
        result = {"metrics": compute_metrics(cfg, feats, ref), "settings": settings}
        sidecar = Path(samples).with_suffix(".json")  # how the samples were drawn (sampling.sampler writes it)
        if Path(samples).suffix == ".npz" and sidecar.is_file():
            result["sampling"] = json.loads(sidecar.read_text())
        return result


def metrics_path(samples: str | os.PathLike) -> Path:
    samples = Path(samples)
    return samples.with_name(samples.name.removesuffix(".npz") + ".metrics.json")


def run(cfg: EvalConfig) -> dict:
    """Evaluate `cfg.samples` against `cfg.reference` and write the metrics JSON."""
    result = Evaluator(cfg).evaluate(cfg.samples, cfg.reference)
    out = Path(cfg.out) if cfg.out else metrics_path(cfg.samples)
    result["settings"]["out"] = str(out)
    write_json_atomic(out, result)
    return result
