"""Train a collaborative-filtering model with the HDCCF loss (or a baseline) and evaluate it.

    python examples/train_ml1m.py                                   # HDCCF on MovieLens-1M, CPU-sized defaults
    python examples/train_ml1m.py --loss bpr                        # the BPR baseline
    python examples/train_ml1m.py --loss softmax                    # in-batch softmax (no debiasing, no aux terms)
    python examples/train_ml1m.py --no-debias --lambda-user 0 --lambda-item 0   # ablations
    python examples/train_ml1m.py --data-dir ~/datasets/ml-1m --split random   # offline: a folder with ratings.dat
    python examples/train_ml1m.py --dataset gowalla --data-dir ../shared/data   # LightGCN's Gowalla split
    python examples/train_ml1m.py --preset paper --device cuda      # paper-scale setting on a GPU
    torchrun --nproc_per_node=2 examples/train_ml1m.py --distributed # several GPUs (or CPU processes)

The data is MovieLens-1M by default: found in --data-dir (ratings.dat, ml-1m.zip or SASRec's
ml-1m.txt[.gz]), else in the download cache ($HDCCF_DATA_DIR or ~/.cache/hdccf_triton), else
downloaded from GroupLens. Every epoch ends with a validation of HR@K and NDCG@K under both
leave-one-out protocols (sampled: the held-out item against 100 sampled items, the paper's;
full: against every item); training stops early when validation NDCG@10 (sampled) stops
improving, the best checkpoint is reloaded and evaluated on the test split, and the results
are written as JSON to --out and printed as the last line. A data set with a given test set
(--dataset gowalla, or a LightGCN folder with train.txt/test.txt) is evaluated the way the
LightGCN/NGCF papers do: per user, every item ranked (training items excluded), Recall@K,
NDCG@K, Precision@K and HitRate@K over the user's test items; validation is one item per user
carved at random (seeded) from the training set and scored the same way, and Recall@20
selects the epochs and α. The checkpoint RUN_DIR/best.pt ends as the model exactly as the
test split scored it (its prior α·log q included). Paths in the JSON that lie under the current folder are
written relative to it. Ctrl-C (SIGINT), or SIGTERM in a single process, stops
training and still evaluates the best checkpoint that this run wrote.

Each run has its own folder (--run-dir, by default a new runs/LOSS-DATE-TIME), locked while it
runs (RUN_DIR/.lock); a folder that holds an earlier run is refused unless --overwrite, and
--resume continues a run from the end of its last finished epoch (RUN_DIR/last.pt). Every file
is written atomically, checkpoints with a checksum verified on load (hdccf_triton.atomic), and
every flag is checked before the data is read (-M and -P against the data and the memory once
it is).

Models trained with in-batch negatives (hdccf, softmax) draw their negatives in proportion to
item frequency q(i), so their raw scores rank items by how much more than their popularity a
user likes them; at inference a prior α·log q(i) is added to every score (see
hdccf_triton.models). With --item-prior tune (the default) epochs are selected with α = τ
(0 for bpr and with --logq), and α is then chosen for every loss alike from --prior-grid on the
validation split before the test evaluation. --logq corrects for that popularity inside the loss
instead (each negative's score minus the log of its sampling probability relative to uniform),
and --mixed-negatives B adds B uniformly drawn items and users per batch as negatives of every
row (hdccf_triton/LOSS.md, "Sampling-bias correction" and "Mixed negatives"). The results JSON holds α ("prior_strength"), the validation
scan ("prior_scan") and the metrics without the prior ("valid_without_prior",
"test_without_prior").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
import uuid
import warnings
from pathlib import Path

import torch

from hdccf_triton import InteractionIndex
from hdccf_triton.atomic import CorruptFileError, check_writable, load_checked, save_checked, write_json
from hdccf_triton.data import DownloadError, load_dataset
from hdccf_triton.metrics import Evaluator
from hdccf_triton.models import (BPRObjective, EmbeddingModel, HDCCFObjective, best_strength,
                                 log_frequency_prior, scan_prior_strengths)
from hdccf_triton.sampling import InBatchSampler
from hdccf_triton.similarity import ModulatedSimilarity

# Settings that differ between presets; a flag given on the command line wins.
PRESETS = {
    # HDCCF's best of six settings on ML-1M validation (examples/results/ml1m_tuning.md); stops early
    # after about 13 epochs, within 30 minutes on a 2-core CPU
    "cpu": dict(batch_size=512, pool=2, dim=64, epochs=15, lr=1e-3, temperature=0.7, patience=2,
                omega_user=0.0, omega_item=0.0),
    # the paper-scale setting, for a GPU
    "paper": dict(batch_size=2048, pool=4, dim=64, epochs=100, lr=1e-3, temperature=0.1, patience=10,
                  omega_user=0.05, omega_item=0.05),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each preset's value, e.g. "tau (preset: cpu 0.7, paper 0.1)", where argparse would say "None"."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if help_text.endswith("(preset)"):
            shown = ", ".join(f"{name} {preset[action.dest]:g}" for name, preset in PRESETS.items())
            return help_text[: -len("(preset)")] + f"(preset: {shown})"
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train an embedding model on implicit feedback with the HDCCF loss "
        "(IJCAI 2022) or a baseline, and report HR@K/NDCG@K under the sampled and full protocols "
        "(leave-one-out data such as ML-1M) or per-user Recall@K/NDCG@K (a given test set such as Gowalla's).",
        formatter_class=HelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="ml-1m",
                      help="ml-1m, ml-100k, gowalla, a LightGCN folder (train.txt/test.txt) or a ratings file")
    data.add_argument("--data-dir", default=os.environ.get("HDCCF_DATA_DIR"),
                      help="folder with local copies of the data (never written to)")
    data.add_argument("--split", default="auto", choices=["auto", "chronological", "random"],
                      help="leave-one-out split: latest items (chronological) or random ones")
    data.add_argument("--min-item-interactions", type=int, default=5, help="drop rarer items (paper: 5)")
    data.add_argument("--save-data", metavar="PATH", default=None,
                      help="write the loaded, split data set to PATH (.pt) and exit; --dataset PATH reads it "
                      "back without parsing, e.g. on a GPU machine without polars")

    loss = p.add_argument_group("loss")
    loss.add_argument("--loss", default="hdccf", choices=["hdccf", "bpr", "softmax"],
                      help="hdccf; bpr (pairwise, one uniform negative); softmax (in-batch, no debias, no aux terms)")
    loss.add_argument("--no-debias", action="store_true", help="HDCCF without false-negative debiasing")
    loss.add_argument("--lambda-user", type=float, default=1.0, help="weight of the user-user term")
    loss.add_argument("--lambda-item", type=float, default=1.0, help="weight of the item-item term")
    loss.add_argument("--similarity", default="dot", choices=["dot", "cosine", "modulated"],
                      help="f(u, i); modulated is the paper's neural modulation (eqs. 7-8)")
    loss.add_argument("--normalize", action="store_true", help="with modulated: cosine of the modulated vectors")
    loss.add_argument("--omega-user", type=float, default=None,
                      help="probability that an unobserved negative user is a false negative (preset)")
    loss.add_argument("--omega-item", type=float, default=None,
                      help="probability that an unobserved negative item is a false negative (preset)")
    loss.add_argument("--temperature", type=float, default=None, help="tau (preset)")
    loss.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                      help="loss backend: auto = Triton on a GPU, PyTorch elsewhere")
    loss.add_argument("--logq", action="store_true",
                      help="hdccf, softmax: sampling-bias correction (logQ): every negative's score minus the log "
                      "of its sampling probability relative to uniform, estimated from the training degrees")
    loss.add_argument("--mixed-negatives", type=int, default=0, metavar="B",
                      help="hdccf, softmax: B items and B users drawn uniformly per batch, extra negatives of every "
                      "row in the user-item term (mixed negative sampling)")

    train = p.add_argument_group("training")
    train.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="the defaults of the flags marked 'preset'")
    train.add_argument("-M", "--batch-size", type=int, default=None, help="observed pairs per batch (preset)")
    train.add_argument("-P", "--pool", type=int, default=None, help="positives sampled per user and item (preset)")
    train.add_argument("--dim", type=int, default=None, help="embedding dimension (preset)")
    train.add_argument("--epochs", type=int, default=None, help="maximum epochs (preset)")
    train.add_argument("--lr", type=float, default=None, help="Adam learning rate (preset)")
    train.add_argument("--weight-decay", type=float, default=0.0, help="L2 penalty of the batch's embeddings")
    train.add_argument("--patience", type=int, default=None, help="epochs without improvement before stopping (preset)")
    train.add_argument("--max-batches", type=int, default=None, help="stop each epoch after this many batches (smoke tests)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    train.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    train.add_argument("--distributed", action="store_true",
                       help="DDP under torchrun: negatives gathered across ranks, evaluation on rank 0")

    out = p.add_argument_group("evaluation and output")
    out.add_argument("--item-prior", default="tune", choices=["tune", "log-frequency", "none"],
                     help="alpha*log(item frequency) added to the inference scores, which undoes the popularity "
                     "bias of in-batch negatives: tune = alpha chosen from --prior-grid on validation after "
                     "training (epochs are selected with alpha = tau, 0 for bpr and with --logq); log-frequency = alpha = tau")
    out.add_argument("--prior-grid", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0],
                     help="candidate alpha of --item-prior tune")
    out.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50],
                     help="cut-offs K of the metrics (HR@K, NDCG@K; Recall@K, NDCG@K, Precision@K, HitRate@K)")
    out.add_argument("--select-protocol", default=None, choices=["sampled", "full", "per_user"],
                     help="protocol of the validation metric that selects the best epoch and alpha "
                     "(default: sampled on leave-one-out data, per_user on a given test set)")
    out.add_argument("--select-metric", default=None,
                     help="that metric (default: NDCG@10 on leave-one-out data, Recall@20 on a given test set)")
    out.add_argument("--run-dir", default=None,
                     help="checkpoint folder, locked while the run uses it; one that holds an earlier run is "
                     "refused unless --overwrite (default: a new folder runs/LOSS-DATE-TIME)")
    out.add_argument("--overwrite", action="store_true",
                     help="reuse a --run-dir that holds an earlier run: its checkpoints and results are deleted")
    out.add_argument("--resume", action="store_true",
                     help="continue the run in --run-dir from the end of its last finished epoch (last.pt), "
                     "with the same flags; gives what an uninterrupted run gives")
    out.add_argument("--out", default=None, help="results JSON (default: RUN_DIR/results.json)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.item_prior == "tune" and not all(math.isfinite(a) for a in args.prior_grid):
        p.error("--prior-grid: expected finite values")
    problem = flag_problem(args)
    if problem:
        p.error(problem)
    if args.resume and (args.run_dir is None or args.overwrite or args.distributed or args.save_data):
        p.error("--resume: needs --run-dir (the run to continue), and goes with neither --overwrite, "
                "--distributed nor --save-data")
    return args


#: flag -> (attribute, lowest value); None (not given) passes for --max-batches and --threads
INT_FLAGS = {"--epochs": ("epochs", 1), "-M/--batch-size": ("batch_size", 1), "-P/--pool": ("pool", 1),
             "--dim": ("dim", 1), "--patience": ("patience", 1), "--max-batches": ("max_batches", 1),
             "--threads": ("threads", 1), "--min-item-interactions": ("min_item_interactions", 0),
             "--mixed-negatives": ("mixed_negatives", 0)}
#: flag -> (attribute, interval text, test)
FLOAT_FLAGS = {
    "--lr": ("lr", "> 0", lambda v: v > 0),
    "--weight-decay": ("weight_decay", ">= 0", lambda v: v >= 0),
    "--temperature": ("temperature", "> 0", lambda v: v > 0),
    "--lambda-user": ("lambda_user", ">= 0", lambda v: v >= 0),
    "--lambda-item": ("lambda_item", ">= 0", lambda v: v >= 0),
    "--omega-user": ("omega_user", "in [0, 1)", lambda v: 0 <= v < 1),
    "--omega-item": ("omega_item", "in [0, 1)", lambda v: 0 <= v < 1),
}


def flag_problem(args) -> str | None:
    """The first flag whose value is out of its range, as an error message; None when all are fine."""
    for flag, (key, lowest) in INT_FLAGS.items():
        value = getattr(args, key)
        if value is not None and value < lowest:  # --max-batches and --threads may be left unset
            return f"{flag}: expected an integer >= {lowest}, got {value}"
    for flag, (key, interval, ok) in FLOAT_FLAGS.items():
        value = getattr(args, key)
        if not (math.isfinite(value) and ok(value)):
            return f"{flag}: expected a finite number {interval}, got {value}"
    bad_ks = [k for k in args.ks if k < 1]
    if bad_ks:
        return f"--ks: expected cut-offs >= 1, got {bad_ks[0]}"
    if args.loss == "bpr" and (args.logq or args.mixed_negatives):
        return "--logq and --mixed-negatives apply to the in-batch losses (hdccf, softmax), not to bpr"
    return None


def data_problem(args, ds, world: int) -> str | None:
    """-M and -P checked against the data set, as an error message; None when they fit."""
    if args.batch_size * world > ds.num_train:
        ranks = f" x {world} ranks" if world > 1 else ""
        return (f"-M/--batch-size: {args.batch_size}{ranks} exceeds the {ds.num_train:,} training pairs of "
                f"{ds.name}")
    limit = min(ds.num_users, ds.num_items)
    if args.pool > limit:
        return (f"-P/--pool: {args.pool} exceeds the catalogue of {ds.name} ({ds.num_users:,} users, "
                f"{ds.num_items:,} items); a row's pools draw P of its user's items and P of its item's users: "
                f"use at most {limit}")
    return None


def working_set_bytes(args) -> int:
    """About the memory one training step of the PyTorch backend holds: the 2·M·P pool embeddings
    (with their gradients and gathered copies), the id pools, and one chunk of in-batch scores
    (hdccf_triton.backends.reference: about 2^22 entries, at least one row of M·P pairs, of
    which the backward keeps about ten copies)."""
    m, p, d = args.batch_size, args.pool, args.dim
    modulated = args.similarity == "modulated"
    width, pair_cost = (2 * d, 2 * d) if modulated else (d, 1)
    per_row = m * p * pair_cost
    chunk = min(m, max(1, (1 << 22) // per_row)) * per_row
    return 4 * (10 * chunk + 6 * m * p * width) + 32 * m * p


def available_memory(device) -> int | None:
    """Bytes free for a new allocation on ``device`` (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_problem(args, device, available: int | None) -> str | None:
    """An error message when the PyTorch backend's working set at -M, -P would not fit; else None."""
    uses_reference = args.backend == "torch" or (args.backend == "auto" and device.type != "cuda")
    if args.loss == "bpr" or not uses_reference or available is None:
        return None
    need = working_set_bytes(args)
    if need <= 0.8 * available:
        return None
    return (f"-M/--batch-size {args.batch_size} and -P/--pool {args.pool}: the loss's working set is about "
            f"{need / 2**30:.1f} GiB (it grows as M x P x d), more than the {available / 2**30:.1f} GiB free "
            f"on {device.type}; use a smaller -M or -P")


def check_outputs(args) -> None:
    """--out and --save-data: fail now, naming the flag, when they could not be written at the end."""
    for flag, value in (("--out", args.out), ("--save-data", args.save_data)):
        if value:
            try:
                check_writable(value, flag)
            except OSError as err:
                sys.exit(f"train_ml1m.py: error: {err.strerror}")


def default_run_dir(args) -> Path:
    """A new folder runs/LOSS-DATE-TIME[-n], created here (so two runs never share it)."""
    stem = Path("runs") / f"{args.loss}-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = stem if n == 1 else stem.with_name(f"{stem.name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"{stem}: no free name")


#: the files a run writes into its folder (and --overwrite deletes)
RUN_FILES = ("best.pt", "last.pt", "results.json")
#: flags that may differ between a run and its --resume
RESUME_MAY_CHANGE = {"run_dir", "out", "threads", "no_progress", "resume", "overwrite", "epochs", "data_dir"}


class RunLock:
    """``RUN_DIR/.lock``, created with O_EXCL and holding the pid, so two runs cannot share a folder.

    A lock whose pid no longer runs (a run that was killed) is taken over with a warning.
    """

    def __init__(self, folder: Path, created: bool = False):
        self.path = folder / ".lock"
        self.token = f"{os.getpid()} {uuid.uuid4().hex}\n"
        self.held = False
        self.created = created  # the folder is new: removed on release if the run left nothing in it

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and _alive(owner):
                    raise RuntimeError(f"--run-dir {self.path.parent} is in use by another run (pid {owner}; lock "
                                       f"file {self.path}): wait for it to end, or choose another --run-dir")
                warnings.warn(f"{self.path}: taking over the lock of a run that has ended "
                              f"({'pid ' + str(owner) if owner else 'no pid'})", stacklevel=2)
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.token)
            self.held = True
            return
        raise RuntimeError(f"--run-dir {self.path.parent}: could not take the lock {self.path}")

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def release(self) -> None:
        if self.held:
            self.held = False
            with contextlib.suppress(OSError):
                if self.path.read_text() == self.token:
                    self.path.unlink()
                    if self.created:
                        self.path.parent.rmdir()  # fails, as it should, unless empty


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_run_dir(args) -> tuple[Path, RunLock]:
    """The run folder, created and locked; one holding an earlier run is refused unless --overwrite,
    which deletes that run's files. Exits with a message naming --run-dir when it cannot be used."""
    try:
        if args.run_dir is None:
            folder, created = default_run_dir(args), True
        else:
            folder = Path(args.run_dir).expanduser()
            created = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        sys.exit(f"train_ml1m.py: error: --run-dir: cannot create {args.run_dir} ({err.strerror or err})")
    try:
        check_writable(folder / RUN_FILES[0], "--run-dir")
    except OSError as err:
        sys.exit(f"train_ml1m.py: error: {err.strerror}")
    lock = RunLock(folder, created)
    try:
        lock.acquire()
    except RuntimeError as err:
        sys.exit(f"train_ml1m.py: error: {err}")
    earlier = sorted(p.name for p in folder.iterdir() if p.name != lock.path.name)
    if args.resume:
        if not (folder / "last.pt").is_file():
            lock.release()
            sys.exit(f"train_ml1m.py: error: --resume: {folder / 'last.pt'} not found (the run ended, or was "
                     "interrupted before its first epoch ended: nothing to continue)")
        return folder, lock
    if earlier and not args.overwrite:
        lock.release()
        sys.exit(f"train_ml1m.py: error: --run-dir {folder} holds an earlier run ({', '.join(earlier[:5])}"
                 f"{', ...' if len(earlier) > 5 else ''}): pass --overwrite to replace it, or choose another --run-dir")
    for name in RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    return folder, lock


def training_prior_strength(args) -> float:
    """α of the prior α·log q(i) that the per-epoch validation uses: τ undoes the popularity the
    in-batch negatives teach the scores (f/τ ≈ log p − log q); with --logq the loss corrects for
    it already, and with bpr (uniform negatives) there is none to undo."""
    if args.item_prior == "none" or (args.item_prior == "tune" and (args.loss == "bpr" or args.logq)):
        return 0.0
    return args.temperature


def setup_distributed(args):
    """(rank, world_size, device) — initialises the process group under torchrun."""
    if not args.distributed:
        device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
        return 0, 1, torch.device("cpu" if device == "auto" else device)
    import torch.distributed as dist

    if "RANK" not in os.environ:
        sys.exit("--distributed needs torchrun: torchrun --nproc_per_node=N examples/train_ml1m.py --distributed")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def load_data(args, progress: bool = True):
    """The data set of --dataset/--data-dir, split; exits with a hint when it is not found."""
    try:
        return load_dataset(args.dataset, args.data_dir, seed=args.seed, split=args.split,
                            min_item_interactions=args.min_item_interactions, progress=progress)
    except (FileNotFoundError, DownloadError) as err:
        sys.exit(f"{err}\nPoint --data-dir (or $HDCCF_DATA_DIR) at a folder holding a copy of the data, "
                 "e.g. --data-dir /path/to/ml-1m (ratings.dat) or a folder with ml-1m.zip.")


def build_model(args, ds, device) -> EmbeddingModel:
    similarity = args.similarity
    if similarity == "modulated":
        similarity = ModulatedSimilarity(args.dim, normalize=args.normalize)
    return EmbeddingModel(ds.num_users, ds.num_items, args.dim, similarity).to(device)


def modulated_cost_note(args, device) -> str | None:
    """A warning for --similarity modulated on a CPU at a batch where an epoch takes long, else None."""
    pairs = args.batch_size * args.pool
    if args.similarity != "modulated" or device.type != "cpu" or pairs <= 128:
        return None
    # measured with bench/train_step_cpu.py (examples/results/README.md, "Training cost and scoring time on a CPU")
    return (f"note: --similarity modulated puts each of the M x P*M in-batch pairs through a d x d product, so "
            f"on a CPU an epoch costs in proportion to M*P = {pairs}: on ML-1M with 2 cores about 33 min per "
            "epoch at M 512, P 2, and about 6 min with -M 128 -P 1 on 1 thread. Use a GPU, or a smaller batch.")


def build_objective(args, model, sampler, world: int = 1):
    index = sampler.interaction_index()
    if args.loss == "bpr":
        return BPRObjective(model, index, seed=args.seed)
    options = dict(temperature=args.temperature, omega_user=args.omega_user, omega_item=args.omega_item,
                   lambda_user=args.lambda_user, lambda_item=args.lambda_item, debias=not args.no_debias,
                   backend=args.backend, gather_across_ranks=args.distributed)
    if args.logq:  # the pools are gathered across the W ranks: M·W rows of pool columns per row
        options["item_log_q"], options["user_log_q"] = sampler.sampling_log_q(batch_size=args.batch_size * world)
    if args.loss == "softmax":
        options.update(debias=False, lambda_user=0.0, lambda_item=0.0, omega_user=0.0, omega_item=0.0)
    if not options["debias"]:
        options.update(omega_user=0.0, omega_item=0.0)
    return HDCCFObjective(model, index, **options)


def local_batches(sampler, epoch, rank, world, batch_size):
    """This rank's batches of ``epoch``: all of them in one process, a shard under DDP."""
    if world == 1:
        yield from sampler.epoch_batches(epoch)
        return
    from hdccf_triton.distributed import shard_indices

    gen = sampler.generator(epoch)  # same permutation on every rank
    rows = shard_indices(sampler.permutation(epoch, gen), rank, world, batch_size)
    pool_gen = torch.Generator(device=sampler.device).manual_seed(args_seed_mix(sampler.seed, epoch, rank))
    for chunk in rows.split(batch_size):
        yield sampler.batch(chunk, pool_gen)


def args_seed_mix(seed, epoch, rank):
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % (2**63)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args)
    lock = None
    if rank == 0:  # before the data is read: a run that cannot write its results does not start
        check_outputs(args)
        if not args.save_data:
            run_dir, lock = claim_run_dir(args)
            args.run_dir = str(run_dir)
    try:
        return run(args, rank, world, device)
    finally:
        if lock is not None:
            lock.release()


def run(args, rank: int, world: int, device) -> dict:
    torch.manual_seed(args.seed + rank)
    t_start = time.time()
    log = print if rank == 0 else (lambda *a, **k: None)

    # ---------------------------------------------------------------- data
    ds = load_data(args, progress=rank == 0)
    log(ds.describe())
    if args.save_data:
        try:
            saved = ds.save(args.save_data) if rank == 0 else None
        except OSError as err:
            sys.exit(f"train_ml1m.py: error: --save-data: {err.strerror or err}")
        log(f"saved to {saved}; train on it with --dataset {saved}")
        return {"saved_data": str(saved)}
    problem = (resolve_selection(args, ds) or data_problem(args, ds, world)
               or memory_problem(args, device, available_memory(device)))
    if problem:
        sys.exit(f"train_ml1m.py: error: {problem}")
    sampler = InBatchSampler(ds.train_users, ds.train_items, ds.num_users, ds.num_items,
                             batch_size=args.batch_size, num_pool=args.pool, seed=args.seed, device=device,
                             drop_last=world > 1, num_extra=args.mixed_negatives)
    index: InteractionIndex = sampler.interaction_index()
    evaluator = Evaluator.from_dataset(ds, seed=args.seed, device=device) if rank == 0 else None

    # ---------------------------------------------------------------- model and objective
    model = build_model(args, ds, device)
    note = modulated_cost_note(args, device)
    if note:
        log(note)
    log_counts = log_frequency_prior(ds.train_items, ds.num_items, 1.0).to(device)
    model.set_item_prior(training_prior_strength(args) * log_counts)
    objective = build_objective(args, model, sampler, world).to(device)
    train_step = objective
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_step = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
    # one fused kernel per step instead of a dozen passes over the tables (CPU and CUDA)
    optimizer = torch.optim.Adam(objective.parameters(), lr=args.lr, fused=device.type in ("cpu", "cuda"))

    run_dir = Path(args.run_dir) if args.run_dir else None
    checkpoint = run_dir / "best.pt" if run_dir else None
    run_id = uuid.uuid4().hex  # in the checkpoint: the one loaded at the end must be this run's
    written = None  # the epoch of the checkpoint this run wrote, if any
    history, best, best_epoch, stale, start = [], -math.inf, -1, 0, 0
    select = f"{args.select_protocol}/{args.select_metric}"
    if args.resume:
        state = resume_state(args, run_dir / "last.pt")
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(objective, state["rng"])
        run_id, history, best, best_epoch, stale = (state[k] for k in ("run_id", "history", "best", "best_epoch",
                                                                         "stale"))
        written = best_epoch if best_epoch >= 1 else None
        start = args.epochs if stale >= args.patience else len(history)  # an early stop stays stopped
        log(f"resuming {run_dir} after epoch {len(history)}")

    # ---------------------------------------------------------------- training
    interrupted = False
    signals = StopOnSignals(world)
    try:
        for epoch in range(start, args.epochs):
            objective.train()
            t_epoch, total, count = time.time(), 0.0, 0
            batches = local_batches(sampler, epoch, rank, world, args.batch_size)
            n_batches = len(sampler) // world if world > 1 else len(sampler)
            if args.max_batches:
                n_batches = min(n_batches, args.max_batches)
            bar = progress(batches, n_batches, f"epoch {epoch + 1}/{args.epochs}", disable=args.no_progress or rank)
            for step, batch in enumerate(bar):
                if args.max_batches and step >= args.max_batches:
                    break
                loss = train_step(batch)
                if args.weight_decay:
                    loss = loss + args.weight_decay * l2_of_batch(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, count = total + loss.item(), count + 1
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{total / count:.4f}")
            record = dict(epoch=epoch + 1, train_loss=total / max(count, 1), seconds=time.time() - t_epoch)
            if rank == 0:
                objective.eval()
                valid = evaluator.evaluate(model, "valid", ks=args.ks)
                record["valid"] = valid
                score = valid[args.select_protocol][args.select_metric]
                # the checkpoint, the best epoch and the history change together: a signal waits
                with signals.deferred():
                    if score > best:
                        save_checked({"model": model.state_dict(), "epoch": epoch + 1, "run_id": run_id,
                                      "config": vars(args)}, checkpoint)
                        best, best_epoch, stale, written = score, epoch + 1, 0, epoch + 1
                    else:
                        stale += 1
                    history.append(record)
                    save_checked({"objective": objective.state_dict(), "optimizer": optimizer.state_dict(),
                                  "rng": rng_state(objective), "run_id": run_id, "history": history, "best": best,
                                  "best_epoch": best_epoch, "stale": stale, "config": vars(args)},
                                 run_dir / "last.pt")
                log(f"epoch {epoch + 1}: loss {record['train_loss']:.4f}  valid {select} {score:.4f}"
                    f"  ({brief(valid)})  {record['seconds']:.0f}s")
            else:
                history.append(record)
            if should_stop(stale >= args.patience, world, device):
                log(f"early stop: no improvement of valid {select} for {args.patience} epochs")
                break
    except KeyboardInterrupt:
        interrupted = True
        log("\ninterrupted: evaluating the best checkpoint so far")
    signals.restore()  # the evaluation runs under the handlers the script started with
    if rank == 0 and not interrupted:  # a run that ended is not resumed: only an interrupted one keeps last.pt
        (run_dir / "last.pt").unlink(missing_ok=True)

    # ---------------------------------------------------------------- test the best checkpoint
    result = None
    if rank == 0:
        if written is not None:
            try:
                state = load_checked(checkpoint, what="checkpoint", map_location=device)
            except (OSError, CorruptFileError) as err:
                sys.exit(f"train_ml1m.py: error: {err}")
            if state.get("run_id") != run_id or state.get("epoch") != best_epoch:
                raise RuntimeError(f"{checkpoint}: holds epoch {state.get('epoch')} of another run, not epoch "
                                   f"{best_epoch} of this one; was --run-dir used by two runs?")
            model.load_state_dict(state["model"])
        else:
            log("no checkpoint was written in this run: scoring the model as it stands")
        result = relative_paths(dict(
            config=vars(args),
            dataset=dict(name=ds.name, num_users=ds.num_users, num_items=ds.num_items,
                         num_train=ds.num_train, stats=jsonable(ds.stats)),
            protocol=("given test set: per-user full ranking (Recall/NDCG/Precision/HitRate@K)"
                      if evaluator.heldout_kind == "sets" else
                      "leave-one-out: sampled (100 negatives) and full ranking (HR/NDCG@K)"),
            selection=f"validation {args.select_protocol} {args.select_metric}",
            best_epoch=best_epoch,
            epochs_run=len(history),
            interrupted=interrupted,
            **final_evaluation(args, model, evaluator, log_counts),
            history=history,
            wall_seconds=round(time.time() - t_start, 1),
            device=device_name(device),
            world_size=world,
            checkpoint=str(checkpoint) if written is not None else None,
        ))
        out = Path(args.out) if args.out else run_dir / "results.json"
        final = StopOnSignals(world)
        try:
            with final.deferred():  # a signal now waits for the files to be whole
                if written is not None:  # the checkpoint becomes the model as the test split scored it
                    state["model"], state["prior_strength"] = model.state_dict(), result["prior_strength"]
                    save_checked(state, checkpoint)
                write_json(out, result)
                print(f"test ({'α = ' + str(result['prior_strength'])}): {brief(result['test'])}")
                print(json.dumps({k: v for k, v in result.items() if k != "history"}))
        finally:
            final.restore()
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


def resolve_selection(args, ds) -> str | None:
    """Fill in --select-protocol/--select-metric from the data; an error message if they do not fit it."""
    given = ds.test_pairs is not None
    protocol = args.select_protocol or ("per_user" if given else "sampled")
    if given != (protocol == "per_user"):
        return (f"--select-protocol: {protocol} does not fit {ds.name}, which "
                + ("has a given test set (use per_user)" if given else "is leave-one-out (use sampled or full)"))
    metric = args.select_metric or ("Recall@20" if protocol == "per_user" else "NDCG@10")
    names = ("Recall", "NDCG", "Precision", "HitRate") if protocol == "per_user" else ("HR", "NDCG")
    name, _, k = metric.partition("@")
    if name not in names or not k.isdigit() or int(k) not in args.ks:
        return (f"--select-metric: {metric!r} is not one of {protocol}'s metrics at the cut-offs --ks "
                f"{' '.join(map(str, args.ks))} ({', '.join(n + '@K' for n in names)})")
    args.select_protocol, args.select_metric = protocol, metric
    return None


def brief(results: dict) -> str:
    """The headline metrics of an evaluation, for the log."""
    if "per_user" in results:
        r = results["per_user"]
        return "  ".join(f"{m} {r[m]:.4f}" for m in ("Recall@20", "NDCG@20") if m in r)
    return f"sampled HR@10 {results['sampled']['HR@10']:.4f}, full HR@10 {results['full']['HR@10']:.4f}"


def final_evaluation(args, model, evaluator, log_counts) -> dict:
    """Validation and test metrics of the loaded checkpoint, with the prior of --item-prior.

    Returns {valid, test, prior_strength[, prior_scan], valid_without_prior, test_without_prior}.
    """
    model.eval()
    out = {}
    raw = "without prior"  # a key of item_offsets beside the α
    if args.item_prior == "tune":
        scan = scan_prior_strengths(model, evaluator, log_counts, [*args.prior_grid], split="valid", ks=args.ks)
        chosen = {a: r[args.select_protocol][args.select_metric] for a, r in scan.items()}
        alpha = best_strength(chosen)
        out["prior_scan"] = {str(a): v for a, v in chosen.items()}
        valid = {alpha: scan[alpha], raw: scan[0.0] if 0.0 in scan else None}
    else:
        alpha, valid = training_prior_strength(args), {}
    # the model scored once per split: with the prior and without it
    model.set_item_prior(None)
    offsets = {alpha: alpha * log_counts, raw: torch.zeros_like(log_counts)}
    if not alpha:  # the prior is zero: no second evaluation without it
        offsets.pop(raw)
    missing = {k: v for k, v in offsets.items() if valid.get(k) is None}
    valid.update(evaluator.evaluate(model, "valid", ks=args.ks, item_offsets=missing) if missing else {})
    test = evaluator.evaluate(model, "test", ks=args.ks, item_offsets=offsets)
    out.update(valid=valid[alpha], test=test[alpha], prior_strength=alpha)
    if alpha:
        out.update(valid_without_prior=valid[raw], test_without_prior=test[raw])
    model.set_item_prior(alpha * log_counts)  # the model as the test split scored it
    return out


def progress(iterable, total, desc, disable):
    if disable:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def l2_of_batch(model, batch):
    users, items = batch[0], batch[1]
    rows = [model.user_table(users), model.item_table(items)]
    return sum(r.pow(2).sum(-1).mean() for r in rows)


def rng_state(objective) -> dict:
    """The random streams a later epoch depends on (the sampler's are seeded per epoch)."""
    state = {"torch": torch.get_rng_state()}
    if isinstance(getattr(objective, "generator", None), torch.Generator):  # BPR's negatives
        state["objective"] = objective.generator.get_state()
    return state


def restore_rng(objective, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "objective" in state:
        objective.generator.set_state(state["objective"])


def resume_state(args, path: Path) -> dict:
    """The state :func:`run` saved in ``path`` after an epoch; exits when it is damaged or from other flags."""
    try:
        state = load_checked(path, what="checkpoint", map_location="cpu")  # RNG states must be on the CPU
    except (OSError, CorruptFileError) as err:
        sys.exit(f"train_ml1m.py: error: --resume: {err}")
    saved = state.get("config", {})
    changed = sorted(k for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE and saved.get(k) != v)
    if changed:
        shown = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {getattr(args, k)!r}" for k in changed)
        sys.exit(f"train_ml1m.py: error: --resume: {path} was written with other flags ({shown}); resume with "
                 "the same flags")
    return state


class StopOnSignals:
    """SIGINT, and SIGTERM in a single process, stop training like Ctrl-C (KeyboardInterrupt);
    :meth:`restore` puts the handlers the script started with back.

    The best checkpoint is then still evaluated and the JSON written: `kill -INT`/`timeout` end a run
    cleanly even where a shell started it with SIGINT ignored (a background job). Under torchrun SIGTERM
    keeps its default, as a rank stopping alone would leave the others waiting in a collective. Inside
    :meth:`deferred` a signal waits until the block has run: a checkpoint and the bookkeeping that
    names it are written together or not at all.
    """

    def __init__(self, world: int):
        self.pending = False
        self.depth = 0
        signals = [signal.SIGINT] + ([signal.SIGTERM] if world == 1 else [])
        self.previous = {signum: signal.signal(signum, self._stop) for signum in signals}

    def _stop(self, signum, frame):
        if self.depth:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.pending and not self.depth:
            self.pending = False
            raise KeyboardInterrupt

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def should_stop(stop: bool, world: int, device) -> bool:
    """Rank 0 decides; every rank follows."""
    if world == 1:
        return stop
    import torch.distributed as dist

    flag = torch.tensor([int(stop)], device=device)
    dist.broadcast(flag, 0)
    return bool(flag.item())


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def relative_paths(obj):
    """``obj`` (a JSON-ready dict) with every absolute path that lies under the current folder made
    relative to it; other paths stay as given. The results JSON names no folder of the machine it ran on."""
    if isinstance(obj, dict):
        return {key: relative_paths(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [relative_paths(value) for value in obj]
    if isinstance(obj, str) and os.path.isabs(obj):
        for path, cwd in ((Path(os.path.normpath(obj)), Path.cwd()), (Path(obj).resolve(), Path.cwd().resolve())):
            if path.is_relative_to(cwd):
                return str(path.relative_to(cwd))
    return obj


def jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


if __name__ == "__main__":
    main()
