"""A command run as two ranks by tests/test_distributed.py: rank 1 fails (a planted fault, as an
out-of-memory or an unreadable shard would) while rank 0 waits for it in a collective."""

import click

from mneme_plugin.commands.common import clear_errors, run_recorded


@click.command()
@click.argument("kind", type=click.Choice(["ours", "other"]))
@clear_errors
def fail_on_rank_one(kind: str) -> None:
    import torch.distributed as dist

    from mneme_plugin.distributed import distributed_context
    from mneme_plugin.errors import ConfigError

    ctx = distributed_context("cpu")
    if ctx.rank == 1:
        if kind == "ours":
            raise ConfigError("shard 7 of the store cannot be read on this node: copy the store again")
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (planted)")
    dist.barrier()  # rank 0 waits for rank 1, which never arrives


if __name__ == "__main__":
    run_recorded(fail_on_rank_one)
