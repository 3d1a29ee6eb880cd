"""Train a collaborative-filtering model with the HDCCF loss (or a baseline) and evaluate it.

    python examples/train_ml1m.py                                   # HDCCF on MovieLens-1M, CPU-sized defaults
    python examples/train_ml1m.py --loss bpr                        # the BPR baseline
    python examples/train_ml1m.py --loss softmax                    # in-batch softmax (no debiasing, no aux terms)
    python examples/train_ml1m.py --no-debias --lambda-user 0 --lambda-item 0   # ablations
    python examples/train_ml1m.py --data-dir ~/datasets/ml-1m --split random   # offline: a folder with ratings.dat
    python examples/train_ml1m.py --preset paper --device cuda      # paper-scale setting on a GPU
    torchrun --nproc_per_node=2 examples/train_ml1m.py --distributed # several GPUs (or CPU processes)

The data is MovieLens-1M by default: found in --data-dir (ratings.dat, ml-1m.zip or SASRec's
ml-1m.txt[.gz]), else in the download cache ($HDCCF_DATA_DIR or ~/.cache/hdccf_triton), else
downloaded from GroupLens. Every epoch ends with a validation of HR@K and NDCG@K under both
protocols (sampled: the held-out item against 100 sampled items, the paper's; full: against
every item); training stops early when validation NDCG@10 stops improving, the best
checkpoint is reloaded and evaluated on the test split, and the results are written as JSON
to --out and printed as the last line. Paths in the JSON that lie under the current folder are
written relative to it. Ctrl-C (SIGINT), or SIGTERM in a single process, stops
training and still evaluates the best checkpoint.

Models trained with in-batch negatives (hdccf, softmax) draw their negatives in proportion to
item frequency q(i), so their raw scores rank items by how much more than their popularity a
user likes them; at inference a prior α·log q(i) is added to every score (see
hdccf_triton.models). With --item-prior tune (the default) epochs are selected with α = τ
(0 for bpr), and α is then chosen for every loss alike from --prior-grid on the validation
split before the test evaluation. The results JSON holds α ("prior_strength"), the validation
scan ("prior_scan") and the metrics without the prior ("valid_without_prior",
"test_without_prior").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from hdccf_triton import InteractionIndex
from hdccf_triton.data import DownloadError, load_dataset
from hdccf_triton.metrics import Evaluator
from hdccf_triton.models import (BPRObjective, EmbeddingModel, HDCCFObjective, log_frequency_prior,
                                 select_prior_strength)
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
        "(IJCAI 2022) or a baseline, and report HR@K/NDCG@K under the sampled and full protocols.",
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
                     "training (epochs are selected with alpha = tau, 0 for bpr); log-frequency = alpha = tau")
    out.add_argument("--prior-grid", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0],
                     help="candidate alpha of --item-prior tune")
    out.add_argument("--ks", type=int, nargs="+", default=[10, 50], help="cut-offs K of HR@K and NDCG@K")
    out.add_argument("--select-protocol", default="sampled", choices=["sampled", "full"],
                     help="protocol whose validation NDCG@10 selects the best epoch")
    out.add_argument("--run-dir", default="runs/latest", help="checkpoint folder")
    out.add_argument("--out", default=None, help="results JSON (default: RUN_DIR/results.json)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if 10 not in args.ks:
        p.error("--ks must include 10 (early stopping uses NDCG@10)")
    if args.item_prior == "tune" and not all(math.isfinite(a) for a in args.prior_grid):
        p.error("--prior-grid: expected finite values")
    return args


def training_prior_strength(args) -> float:
    """α of the prior α·log q(i) that the per-epoch validation uses."""
    if args.item_prior == "none" or (args.item_prior == "tune" and args.loss == "bpr"):
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


def build_objective(args, model, index):
    if args.loss == "bpr":
        return BPRObjective(model, index, seed=args.seed)
    options = dict(temperature=args.temperature, omega_user=args.omega_user, omega_item=args.omega_item,
                   lambda_user=args.lambda_user, lambda_item=args.lambda_item, debias=not args.no_debias,
                   backend=args.backend, gather_across_ranks=args.distributed)
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
    torch.manual_seed(args.seed + rank)
    t_start = time.time()
    log = print if rank == 0 else (lambda *a, **k: None)

    # ---------------------------------------------------------------- data
    ds = load_data(args, progress=rank == 0)
    log(ds.describe())
    if args.save_data:
        saved = ds.save(args.save_data) if rank == 0 else None
        log(f"saved to {saved}; train on it with --dataset {saved}")
        return {"saved_data": str(saved)}
    sampler = InBatchSampler(ds.train_users, ds.train_items, ds.num_users, ds.num_items,
                             batch_size=args.batch_size, num_pool=args.pool, seed=args.seed, device=device,
                             drop_last=world > 1)
    index: InteractionIndex = sampler.interaction_index()
    evaluator = Evaluator.from_dataset(ds, seed=args.seed, device=device) if rank == 0 else None

    # ---------------------------------------------------------------- model and objective
    model = build_model(args, ds, device)
    note = modulated_cost_note(args, device)
    if note:
        log(note)
    log_counts = log_frequency_prior(ds.train_items, ds.num_items, 1.0).to(device)
    model.set_item_prior(training_prior_strength(args) * log_counts)
    objective = build_objective(args, model, index).to(device)
    train_step = objective
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_step = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(objective.parameters(), lr=args.lr)

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / "best.pt"
    history, best, best_epoch, stale = [], -math.inf, -1, 0
    select = f"{args.select_protocol}/NDCG@10"

    # ---------------------------------------------------------------- training
    interrupted = False
    previous_handlers = stop_training_on_signals(world)
    try:
        for epoch in range(args.epochs):
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
            improved = False
            if rank == 0:
                objective.eval()
                valid = evaluator.evaluate(model, "valid", ks=args.ks)
                record["valid"] = valid
                score = valid[args.select_protocol]["NDCG@10"]
                improved = score > best
                if improved:
                    best, best_epoch, stale = score, epoch + 1, 0
                    # written aside, then renamed: a signal mid-write cannot leave a torn best checkpoint
                    torch.save({"model": model.state_dict(), "epoch": epoch + 1, "config": vars(args)},
                               checkpoint.with_suffix(".tmp"))
                    os.replace(checkpoint.with_suffix(".tmp"), checkpoint)
                else:
                    stale += 1
                log(f"epoch {epoch + 1}: loss {record['train_loss']:.4f}  valid {select} {score:.4f}"
                    f"  (sampled HR@10 {valid['sampled']['HR@10']:.4f}, full HR@10 {valid['full']['HR@10']:.4f})"
                    f"  {record['seconds']:.0f}s")
            history.append(record)
            if should_stop(stale >= args.patience, world, device):
                log(f"early stop: no improvement of valid {select} for {args.patience} epochs")
                break
    except KeyboardInterrupt:
        interrupted = True
        log("\ninterrupted: evaluating the best checkpoint so far")
    for signum, handler in previous_handlers.items():
        signal.signal(signum, handler)  # the evaluation runs under the handlers the script started with

    # ---------------------------------------------------------------- test the best checkpoint
    result = None
    if rank == 0:
        if checkpoint.exists():
            model.load_state_dict(torch.load(checkpoint, map_location=device)["model"])
        result = relative_paths(dict(
            config=vars(args),
            dataset=dict(name=ds.name, num_users=ds.num_users, num_items=ds.num_items,
                         num_train=ds.num_train, stats=jsonable(ds.stats)),
            best_epoch=best_epoch,
            epochs_run=len(history),
            interrupted=interrupted,
            **final_evaluation(args, model, evaluator, log_counts),
            history=history,
            wall_seconds=round(time.time() - t_start, 1),
            device=device_name(device),
            world_size=world,
            checkpoint=str(checkpoint),
        ))
        out = Path(args.out) if args.out else run_dir / "results.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


def final_evaluation(args, model, evaluator, log_counts) -> dict:
    """Validation and test metrics of the loaded checkpoint, with the prior of --item-prior.

    Returns {valid, test, prior_strength[, prior_scan], valid_without_prior, test_without_prior}.
    """
    model.eval()
    out = {}
    if args.item_prior == "tune":
        alpha, scan = select_prior_strength(model, evaluator, log_counts, args.prior_grid, split="valid",
                                            protocol=args.select_protocol, ks=args.ks)
        out["prior_scan"] = {str(a): v for a, v in scan.items()}
    else:
        alpha = training_prior_strength(args)
    model.set_item_prior(alpha * log_counts)
    out.update(valid=evaluator.evaluate(model, "valid", ks=args.ks),
               test=evaluator.evaluate(model, "test", ks=args.ks), prior_strength=alpha)
    if alpha:
        model.set_item_prior(None)
        out.update(valid_without_prior=evaluator.evaluate(model, "valid", ks=args.ks),
                   test_without_prior=evaluator.evaluate(model, "test", ks=args.ks))
        model.set_item_prior(alpha * log_counts)
    return out


def progress(iterable, total, desc, disable):
    if disable:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def l2_of_batch(model, batch):
    users, items, pool_items, pool_users = batch
    rows = [model.user_table(users), model.item_table(items)]
    return sum(r.pow(2).sum(-1).mean() for r in rows)


def stop_training_on_signals(world: int) -> dict:
    """Make SIGINT, and SIGTERM in a single process, stop training like Ctrl-C; returns the old handlers.

    The best checkpoint is then still evaluated and the JSON written: `kill -INT`/`timeout` end a run
    cleanly even where a shell started it with SIGINT ignored (a background job). Under torchrun SIGTERM
    keeps its default, as a rank stopping alone would leave the others waiting in a collective.
    """

    def stop(signum, frame):
        raise KeyboardInterrupt

    signals = [signal.SIGINT] + ([signal.SIGTERM] if world == 1 else [])
    return {signum: signal.signal(signum, stop) for signum in signals}


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
