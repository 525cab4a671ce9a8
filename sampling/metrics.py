"""FID / sFID / IS / precision / recall / KID of sample images against a reference, through torch-fidelity.

The numbers follow the ADM evaluator's conventions (DESIGN.md 5; guided-diffusion evaluations/evaluator.py):
Inception-v3 features from the TF 2015-12-05 graph (torch-fidelity's `inception-v3-compat`); FID on the pool
features and sFID on the spatial features of TF's `mixed_6/conv`, each against the reference's stored
statistics (`mu`/`sigma`, `mu_s`/`sigma_s`) when it carries them; IS over consecutive chunks of 5000 samples
(the last one partial); precision/recall on pool features. Samples and reference must have one image size.
Nothing downloads: the Inception weights come from a local file, and a missing file fails at once.
"""
import contextlib
import hashlib
import json
import os
import re
import socket
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from tokenizer.common.errors import BadFileError, ConfigError, MissingFileError
from tokenizer.common.io import atomic_path, reading, sha256_file, write_json_atomic, zip_data_offset

TORCH_FIDELITY_MIN = (0, 4, 0)


def check_torch_fidelity(version: str) -> None:
    """Refuse torch-fidelity builds whose numbers differ: 0.3.x has no precision/recall module, and the
    0.4.0-beta builds return precision and recall swapped for the argument order used here."""
    release = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", version)
    if release is None or tuple(map(int, release.groups())) < TORCH_FIDELITY_MIN:
        raise ImportError(f"torch-fidelity {version} is installed; the evaluation needs a release >= "
                          f"{'.'.join(map(str, TORCH_FIDELITY_MIN))} (no pre-release: the 0.4.0-beta builds swap "
                          f"precision and recall): pip install 'torch-fidelity>=0.4.0'")


check_torch_fidelity(torch_fidelity.__version__)  # before the imports below, which 0.3.x lacks

from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric  # noqa: E402
from torch_fidelity.metric_kid import kid_features_to_metric  # noqa: E402
from torch_fidelity.metric_prc import prc_features_to_metric  # noqa: E402
from torch_fidelity.utils import create_feature_extractor  # noqa: E402

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)
INCEPTION_WEIGHTS_ENV = "MGVQ_INCEPTION_WEIGHTS"
FEATURE_EXTRACTOR = "inception-v3-compat"
POOL, LOGITS = "2048", "logits_unbiased"  # FID/KID/PRC features; IS logits without the fc bias, as ADM
# sFID features: TF's mixed_6/conv (the 1x1 branch of the 4th 17x17 block, after its BN and ReLU) is
# torch-fidelity's Mixed_6d.branch1x1, (B, 192, 17, 17); ADM keeps its first 7 channels.
SPATIAL, SPATIAL_MODULE, SPATIAL_CHANNELS = "mixed_6/conv", "Mixed_6d.branch1x1", 7
# ADM's stored reference statistics per metric, and the features each metric is computed on
STORED_STATS = {"fid": ("mu", "sigma"), "sfid": ("mu_s", "sigma_s")}
FRECHET_FEATURES = {"fid": POOL, "sfid": SPATIAL}
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
    sfid: bool = True  # FID on ADM's spatial features (TF mixed_6/conv, first 7 channels)
    isc: bool = True
    prc: bool = True
    kid: bool = False
    isc_split_size: int = ADM_IS_SPLIT_SIZE  # IS per consecutive chunk of this many samples, the last one partial
    prc_neighborhood: int = 3
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    seed: int = 2020  # KID subset draws
    allow_size_mismatch: bool = False  # score samples whose image size differs from the reference's anyway
    progress: bool = True


def _zip_info(path: Path, name: str) -> zipfile.ZipInfo:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.getinfo(name + ".npy")
    except zipfile.BadZipFile as e:
        raise BadFileError(f"{path} is not an .npz file: {e}") from None
    except KeyError:
        raise BadFileError(f"{path} has no array {name!r}") from None


def _read_npy_header(f) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read_header(f)


def npz_shape(path: str | os.PathLike, name: str = "arr_0") -> tuple[int, ...]:
    """Shape of member `name` of an .npz, from its .npy header: nothing of the array is read or decompressed."""
    path = Path(path)
    info = _zip_info(path, name)
    with zipfile.ZipFile(path) as zf, zf.open(info) as f:  # streams: only the header is inflated
        return tuple(_read_npy_header(f)[0])


def _npz_member(path: Path, name: str) -> np.ndarray:
    """Memory-map member `name` of an uncompressed .npz; a compressed member is read into RAM."""
    info = _zip_info(path, name)
    if info.compress_type != zipfile.ZIP_STORED:
        warnings.warn(f"{path}:{name} is compressed and cannot be memory-mapped; reading it into RAM "
                      f"(write it with np.savez, not np.savez_compressed, to stream it)", stacklevel=2)
        with np.load(path) as npz:
            return npz[name]
    with open(path, "rb") as f, reading(path, "array file"):
        f.seek(zip_data_offset(f, info))
        shape, fortran_order, dtype = _read_npy_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise BadFileError(f"{path}:{name} holds Python objects, not an image array")
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
            raise BadFileError(f"{path}:{key} must be uint8 (N,H,W,3) images, got {self._array.dtype} "
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
            raise MissingFileError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        with Image.open(self.files[0]) as im:
            self.size = im.size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with reading(self.files[i], "image"), Image.open(self.files[i]) as im:
            if im.size != self.size:
                raise BadFileError(f"{self.files[i]} is {im.size[0]}x{im.size[1]} but {self.files[0]} is "
                                 f"{self.size[0]}x{self.size[1]}: resize the folder to one size first")
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def open_images(path: str | os.PathLike) -> Dataset:
    path = Path(path)
    if path.is_dir():
        return FolderImages(path)
    if not path.is_file():
        raise MissingFileError(f"no such sample file or image folder: {path}")
    return NpzImages(path)


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(H, W) of the images of a sample/reference .npz (from arr_0's header, nothing loaded) or folder;
    None for an .npz that holds only statistics."""
    path = Path(path)
    if path.is_dir():
        w, h = FolderImages(path).size
        return h, w
    if "arr_0" not in npz_members(path):
        return None
    shape = npz_shape(path)
    if len(shape) != 4:
        raise BadFileError(f"{path}:arr_0 must be (N,H,W,3) images, got shape {shape}")
    return shape[1], shape[2]


def check_resolution(samples: str | os.PathLike, reference: str | os.PathLike,
                     allow_mismatch: bool = False) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """The (H, W) of the samples and of the reference, refusing a difference unless `allow_mismatch`.

    Inception resizes every input to 299, so samples at another size than the reference shift FID (MGVQ
    resizes its 384px samples to 256 before scoring them against ADM's 256px reference).
    """
    samples_size, reference_size = image_size(samples), image_size(reference)
    if reference_size is None:
        warnings.warn(f"{reference} holds statistics but no images (arr_0): the samples' size "
                      f"{samples_size[0]}x{samples_size[1]} cannot be checked against the reference's", stacklevel=2)
    elif samples_size != reference_size and not allow_mismatch:
        (h, w), (rh, rw) = samples_size, reference_size
        raise ConfigError(
            f"the samples {samples} are {h}x{w} but the reference {reference} is {rh}x{rw}: scores at "
            f"another size are not comparable. Draw the samples with eval_size={rh} (the sampler's bicubic "
            f"resize, as MGVQ does for 256px numbers), or set allow_size_mismatch=true to score them anyway")
    return samples_size, reference_size


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
        raise MissingFileError(
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
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(conv, "fp32_precision"):  # torch >= 2.9
        owner, name, exact = conv, "fp32_precision", "ieee"
    else:  # older torch: the one switch for every cuDNN op
        owner, name, exact = torch.backends.cudnn, "allow_tf32", False
    previous = getattr(owner, name)
    setattr(owner, name, exact)
    try:
        yield
    finally:
        setattr(owner, name, previous)


def spatial_features(branch1x1: torch.Tensor) -> torch.Tensor:
    """Mixed_6d.branch1x1's output (B, 192, 17, 17) -> ADM's sFID features (B, 17 * 17 * 7 = 2023) float32.

    ADM slices TF's NHWC tensor mixed_6/conv:0 to [..., :7] and flattens each image, i.e. in (h, w, c) order.
    """
    return branch1x1[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(branch1x1.shape[0], -1).float()


FEATURE_DIMS = {POOL: 2048, SPATIAL: 17 * 17 * SPATIAL_CHANNELS}


@dataclass
class Reference:
    """What the metrics need from the reference: its features (PRC, KID, FID, sFID) and/or stored statistics."""
    features: dict[str, torch.Tensor]  # {POOL: (N_ref, 2048), SPATIAL: (N_ref, 2023)} float32; {} when unused
    stats: dict[str, dict]  # ADM's stored {"fid": {"mu", "sigma"}, "sfid": {...}}, the metrics it has them for
    sha256: str

    @property
    def num_images(self) -> int:
        return len(self.features[POOL]) if self.features else 0


def adm_stats(path: str | os.PathLike) -> dict[str, dict]:
    """ADM reference statistics stored in an .npz, in torch-fidelity's dtypes: {"fid": {"mu": (2048,),
    "sigma": (2048, 2048)}} from mu/sigma, {"sfid": ...} (2023 features) from mu_s/sigma_s, where present."""
    path = Path(path)
    members = set() if path.is_dir() else set(npz_members(path))
    out = {}
    for metric, (mu_key, sigma_key) in STORED_STATS.items():
        if not {mu_key, sigma_key} <= members:
            continue
        with reading(path, "reference statistics file"), np.load(path) as npz:
            mu, sigma = npz[mu_key], npz[sigma_key]
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise BadFileError(f"{path}: {mu_key}/{sigma_key} hold NaN or infinite values: the reference statistics "
                               f"are damaged")
        d = FEATURE_DIMS[FRECHET_FEATURES[metric]]
        if mu.shape != (d,) or sigma.shape != (d, d):
            raise BadFileError(f"{path}: {mu_key}/{sigma_key} must be ({d},) and ({d}, {d}) statistics, "
                             f"got {mu.shape} and {sigma.shape}")
        # torch-fidelity's own statistics are float32 means (of float32 features) and float64 covariances
        # (np.cov), and fid_statistics_to_metric insists both sides share those dtypes
        out[metric] = {"mu": mu.astype(np.float32), "sigma": sigma.astype(np.float64)}
    return out


def reference_has_images(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() or "arr_0" in npz_members(path)


def reference_cache_key(reference_sha256: str, weights_sha256: str) -> str:
    """Names the cached reference features by everything they depend on: data, weights, extractor code."""
    spatial = f"{SPATIAL.replace('/', '_')}{SPATIAL_CHANNELS}"
    return (f"ref-{reference_sha256[:16]}-w{weights_sha256[:16]}-{FEATURE_EXTRACTOR}-{POOL}-{spatial}"
            f"-tf{torch_fidelity.__version__}")


def inception_score(logits: torch.Tensor, split_size: int = ADM_IS_SPLIT_SIZE) -> tuple[float, float]:
    """ADM's IS: logits (N, C) -> mean and std over consecutive chunks of `split_size` samples, the last one
    partial (12k samples: 5000 + 5000 + 2000), of exp(mean over the chunk of KL(p(y|x) || the chunk's p(y))).

    torch-fidelity's isc_features_to_metric splits into equal parts instead (12k: 2 x 6000).
    """
    logits = logits.double()
    scores = []
    for chunk in logits.split(split_size):  # (n <= split_size, C)
        log_p = chunk.log_softmax(1)
        p = log_p.exp()
        kl = (p * (log_p - p.mean(0, keepdim=True).log())).sum(1)  # (n,)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def check_sizes(cfg: EvalConfig, num_samples: int, num_reference: int | None) -> None:
    """Fail before the long extraction on sizes torch-fidelity rejects late or turns into NaN silently."""
    problems = []
    if (cfg.fid or cfg.sfid) and num_samples < 2:
        problems.append(f"FID and sFID need at least 2 samples, got {num_samples}")
    if cfg.isc and cfg.isc_split_size < 1:
        problems.append(f"isc_split_size={cfg.isc_split_size}: expected at least 1 sample per chunk")
    for name, n in (("samples", num_samples), ("reference images", num_reference)):
        if n is None:
            continue
        if cfg.prc and n <= cfg.prc_neighborhood:
            problems.append(f"precision/recall with prc_neighborhood={cfg.prc_neighborhood} need more than "
                            f"{cfg.prc_neighborhood} {name}, got {n}")
        if cfg.kid and n < cfg.kid_subset_size:
            problems.append(f"kid_subset_size={cfg.kid_subset_size} exceeds the {n} {name}")
    if problems:
        raise ConfigError("; ".join(problems))


def compute_metrics(cfg: EvalConfig, feats: dict[str, torch.Tensor], ref: Reference | None) -> dict[str, float]:
    """The metrics `cfg` asks for, from sample features and the reference (pure computation, seconds)."""
    out = {}
    pool = feats[POOL]  # (N, 2048)
    for metric, layer in FRECHET_FEATURES.items():  # fid, sfid
        if getattr(cfg, metric):
            ref_stats = ref.stats.get(metric) or fid_features_to_statistics(ref.features[layer])
            fid = fid_statistics_to_metric(fid_features_to_statistics(feats[layer]), ref_stats, verbose=False)
            out[metric] = fid[torch_fidelity.KEY_METRIC_FID]
    if cfg.isc:
        out["inception_score"], out["inception_score_std"] = inception_score(feats[LOGITS], cfg.isc_split_size)
    if cfg.prc:
        # chunked distances (save_cpu_ram): the full-matrix path needs tens of GB at 50k
        prc = prc_features_to_metric(pool, ref.features[POOL], prc_neighborhood=cfg.prc_neighborhood,
                                     save_cpu_ram=True, verbose=False)
        out["precision"] = prc[torch_fidelity.KEY_METRIC_PRECISION]
        out["recall"] = prc[torch_fidelity.KEY_METRIC_RECALL]
    if cfg.kid:
        kid = kid_features_to_metric(pool, ref.features[POOL], kid_subsets=cfg.kid_subsets,
                                     kid_subset_size=cfg.kid_subset_size, rng_seed=cfg.seed, verbose=False)
        out["kid"] = kid[torch_fidelity.KEY_METRIC_KID_MEAN]
        out["kid_std"] = kid[torch_fidelity.KEY_METRIC_KID_STD]
    return out


def _default_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "mgvq-gpt" / "fidelity"


def finite_metrics(metrics: dict[str, float], samples, reference) -> dict[str, float]:
    """`metrics` when every value is finite; else an error naming the metrics and both inputs (a NaN is not
    valid JSON, and a metrics file must never hold one)."""
    bad = {k: m for k, m in metrics.items() if not np.isfinite(m)}
    if bad:
        raise BadFileError(f"{', '.join(f'{k}={m}' for k, m in bad.items())} scoring the samples {samples} against "
                           f"the reference {reference}: one of them holds damaged (non-finite) data; nothing was "
                           f"written")
    return metrics


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
        # sFID's features come from inside the network, in the same pass as the pool features and logits
        self._spatial: torch.Tensor | None = None
        self.extractor.get_submodule(SPATIAL_MODULE).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output: torch.Tensor) -> None:
        self._spatial = spatial_features(output)  # (B, 2023)

    @torch.no_grad()
    def features(self, images: Dataset, desc: str = "inception") -> dict[str, torch.Tensor]:
        """Features of every image, in order: {"2048": (N, 2048), "mixed_6/conv": (N, 2023),
        "logits_unbiased": (N, 1008) when cfg.isc} float32."""
        cuda = self.device.type == "cuda"
        loader = DataLoader(images, batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers,
                            pin_memory=cuda)
        out = {name: [] for name in [*self.extractor.get_requested_features_list(), SPATIAL]}
        with tqdm(total=len(images), unit="img", desc=desc, disable=not self.cfg.progress) as bar, \
                _exact_float32_convs():
            for batch in loader:  # (B, 3, H, W) uint8
                self._spatial = None
                feats = self.extractor(batch.to(self.device, non_blocking=cuda))
                for name, f in self.extractor.convert_features_tuple_to_dict(feats).items():
                    out[name].append(f.cpu())
                out[SPATIAL].append(self._spatial.cpu())
                bar.update(batch.shape[0])
        return {name: torch.cat(fs) for name, fs in out.items()}

    def reference(self, path: str | os.PathLike, stats: dict[str, dict], need_images: bool) -> Reference:
        """The reference, memoised: a sweep scores many sample sets against one."""
        key = (str(path), need_images)
        if key not in self._references:
            self._references[key] = self._load_reference(path, stats, need_images)
        return self._references[key]

    def _load_reference(self, path: str | os.PathLike, stats: dict[str, dict], need_images: bool) -> Reference:
        """Pool and spatial features of the reference images when needed, cached on disk (reference_cache_key)."""
        sha = sha256_images(path, self.cfg.progress)
        if not need_images:
            return Reference(features={}, stats=stats, sha256=sha)
        cache = self.cache_root / (reference_cache_key(sha, self.weights_sha256) + ".pt")
        if cache.is_file():
            cached = torch.load(cache, weights_only=True)
            return Reference(features={POOL: cached["pool"], SPATIAL: cached["spatial"]}, stats=stats, sha256=sha)
        feats = self.features(open_images(path), desc="inception (reference)")
        with atomic_path(cache) as tmp:
            torch.save({"pool": feats[POOL], "spatial": feats[SPATIAL], "reference": str(path),
                        "reference_sha256": sha, "weights_sha256": self.weights_sha256}, tmp)
        return Reference(features={POOL: feats[POOL], SPATIAL: feats[SPATIAL]}, stats=stats, sha256=sha)

    def evaluate(self, samples: str | os.PathLike, reference: str | os.PathLike) -> dict:
        """Metrics of a sample file or folder against a reference, with every setting that produced them."""
        cfg = self.cfg
        if not (cfg.fid or cfg.sfid or cfg.isc or cfg.prc or cfg.kid):
            raise ConfigError("no metric requested: set at least one of fid, sfid, isc, prc, kid")
        images = open_images(samples)
        if not Path(reference).exists():
            raise MissingFileError(f"no such reference file or image folder: {reference}")
        stats = adm_stats(reference)
        unstored = [m for m in STORED_STATS if getattr(cfg, m) and m not in stats]
        need_ref_images = cfg.prc or cfg.kid or bool(unstored)
        if need_ref_images and not reference_has_images(reference):
            raise ConfigError(f"{reference} holds no images (arr_0) and not every statistic: precision, recall, KID "
                             f"and {' and '.join(unstored) or 'FID'} without stored statistics need the reference "
                             f"images (set prc=false kid=false{''.join(f' {m}=false' for m in unstored)})")
        check_sizes(cfg, len(images), len(open_images(reference)) if need_ref_images else None)
        sizes = check_resolution(samples, reference, cfg.allow_size_mismatch)
        ref = self.reference(reference, stats, need_ref_images)
        feats = self.features(images, desc="inception (samples)")
        settings = asdict(cfg) | {
            "samples": str(samples), "reference": str(reference),
            "num_samples": len(images), "num_reference_images": ref.num_images,
            "sample_size": list(sizes[0]), "reference_size": sizes[1] and list(sizes[1]),  # [H, W]
            **{f"{m}_reference": f"stored {'/'.join(STORED_STATS[m])}" if m in ref.stats else "reference images"
               for m in STORED_STATS},
            "isc_chunks": -(-len(images) // cfg.isc_split_size), "isc_shuffle": False,
            "reference_sha256": ref.sha256, "inception_weights": str(self.weights),
            "inception_weights_sha256": self.weights_sha256, "feature_extractor": FEATURE_EXTRACTOR,
            "torch_fidelity": torch_fidelity.__version__, "device": str(self.device),
        }
        result = {"metrics": finite_metrics(compute_metrics(cfg, feats, ref), samples, reference),
                  "settings": settings}
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
    zoo = result.get("sampling", {}).get("zoo")
    if zoo:  # samples of a released model (sampling.zoo): its published numbers beside the measured ones
        result["published"] = zoo["published"]
    out = Path(cfg.out) if cfg.out else metrics_path(cfg.samples)
    result["settings"]["out"] = str(out)
    write_json_atomic(out, result)
    return result
