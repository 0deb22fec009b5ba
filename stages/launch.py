"""launch: run a sharded stage (golden, evaluate, sweep) on every GPU of this machine, or every CPU core.

    python -m stages.launch golden --no-progress

starts `torchrun --standalone --nproc_per_node N -m stages.golden --no-progress`, N from clipprune.dist
(CLIPPRUNE_NPROC overrides it); N = 1 runs the stage in this process, without torchrun. Results are
byte-identical for any N, so N is a property of the machine, not a param: a param would rerun these stages
after moving to another machine. Several machines: run plain torchrun on each (README, "N machines").
"""
import logging
import os
import runpy
import sys

from clipprune.errors import ClipPruneError

SHARDED = ("golden", "evaluate", "sweep")


def main(argv: list[str]) -> int:
    from clipprune.dist import NPROC_ENV, n_gpus, nproc_per_node, usable_cpus

    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        print(f"\nStages: {', '.join(SHARDED)}; each one's own options: python -m stages.<stage> --help")
        return 0
    if not argv or argv[0] not in SHARDED:
        raise ClipPruneError(f"usage: python -m stages.launch {{{','.join(SHARDED)}}} [stage options]")
    stage, args = argv[0], argv[1:]
    module = f"stages.{stage}"
    if "LOCAL_RANK" in os.environ:  # already a torchrun worker (e.g. torchrun --nnodes N -m stages.launch ...)
        nproc = 1
    else:
        nproc = nproc_per_node(n_gpus=n_gpus(), n_cpus=usable_cpus(), override=os.environ.get(NPROC_ENV))
    if nproc == 1:
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if "LOGLEVEL" not in os.environ:  # torchrun's agent logs repeat what the workers say; LOGLEVEL=INFO shows them
        for name, logger in logging.root.manager.loggerDict.items():
            if name.startswith("torch.distributed") and isinstance(logger, logging.Logger):
                logger.setLevel(logging.CRITICAL)

    try:
        torchrun(["--standalone", "--nproc_per_node", str(nproc), "-m", module, *args])
    except ChildFailedError as e:  # no agent traceback on top of what the workers printed
        rank, failure = e.get_first_failure()  # the others were stopped because of it
        if failure.exitcode != 2:  # 2: the worker printed its one-line error itself
            print(f"error: {module} failed on rank {rank} with exit code {failure.exitcode} (negative: killed by "
                  "that signal, e.g. -9 out of memory)", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ClipPruneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
