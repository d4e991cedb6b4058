"""Many machines: ``--num-nodes`` sizes the run and reaches Lightning.

- The global batch counts every process of every machine (batch_size x devices x num_nodes), so
  the step count, the epochs and the learning-rate schedule of an epoch-sized run follow it.
- Two "machines" of one process each, on this one machine over gloo, give the same run as one
  process with the whole global batch, launched as on a cluster: one
  ``torchrun --nnodes 2 --nproc-per-node 1 --node-rank i`` per machine (Lightning's
  ``TorchElasticEnvironment``), or one bare ``python -m training.fit`` per machine with
  ``NODE_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` set (Lightning's ``LightningEnvironment``).
  Each machine writes to its own ``--output-dir``, as machines without a shared file system
  would: only global rank 0 writes metrics, logs, the model and checkpoints.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.conftest import REPO_ROOT
from tests.training.conftest import (
    STEP_KEYS,
    assert_steps_close,
    assert_weights_close,
    base_args,
    child_env,
    fit,
    read_metrics,
)
from training.base.cli import resolve_config
from training.base.errors import RunError
from training.fit import check_world_size, epochs_needed, main, total_optimizer_steps
from training.inputs.precompute import pairs_read


def test_global_batch_counts_every_machine():
    cfg, _ = resolve_config(["--batch-size", "2", "--devices", "2", "--num-nodes", "3"])
    assert (cfg.trainer.world_size, cfg.trainer.pairs_per_batch) == (6, 12)
    # 100 rows in batches of 12 pairs: 9 batches, 5 optimizer steps per epoch with 2 accumulated
    cfg.trainer.gradient_accumulation_steps = 2
    cfg.trainer.num_train_epochs = 2
    assert total_optimizer_steps(cfg, 100) == 10
    assert epochs_needed(cfg, 100, 10) == 2
    assert pairs_read(cfg, 10) == 10 * 12 * 2


def test_num_nodes_below_one_is_refused(capsys):
    assert main(["--num-nodes", "0", "--print-config"]) == 2
    assert "--num-nodes must be >= 1, got 0" in capsys.readouterr().err


def test_a_world_size_the_steps_were_not_sized_for_is_refused():
    """``--devices -1`` on a machine of 8 GPUs: Lightning runs 8 processes per machine, the step
    count assumed 1."""
    cfg, _ = resolve_config(["--devices", "-1", "--num-nodes", "2"])
    check_world_size(SimpleNamespace(world_size=2), cfg)
    with pytest.raises(RunError, match="Lightning runs 16 processes, but --devices -1"):
        check_world_size(SimpleNamespace(world_size=16), cfg)


def free_port() -> int:
    """A TCP port free on this machine now (torchrun's rendezvous store listens on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_command(launcher: str, node_rank: int, nodes: int, port: str, argv: list[str]):
    """(command, environment) that starts ``python -m training.fit argv`` as machine
    ``node_rank`` of ``nodes``: through ``torchrun`` (Lightning's ``TorchElasticEnvironment``),
    or bare, Lightning itself reading ``NODE_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``
    (``LightningEnvironment``)."""
    env = child_env()
    fit_module = ["training.fit", *argv]
    if launcher == "torchrun":
        torchrun = ["-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", "1"]
        torchrun += ["--node-rank", str(node_rank), "--master-addr", "127.0.0.1"]
        return [sys.executable, *torchrun, "--master-port", port, "-m", *fit_module], env
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node_rank))
    return [sys.executable, "-m", *fit_module], env


def launch_machines(
    argvs: list[list[str]], launcher: str, timeout: float = 240
) -> list[tuple[int, str]]:
    """``argvs[i]`` run as machine i (``machine_command``), all at once on this one;
    (return code, stdout + stderr) of each."""
    port = str(free_port())
    children = []
    for node_rank, argv in enumerate(argvs):
        command, env = machine_command(launcher, node_rank, len(argvs), port, argv)
        children.append(
            subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    results = []
    try:
        for child in children:
            output, _ = child.communicate(timeout=timeout)
            results.append((child.returncode, output))
    finally:
        for child in children:
            child.kill()
    return results


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "lightning"])
def test_two_machines_of_one_process_equal_one_process(tiny_assets, tmp_path, launcher):
    """An epoch-sized run (no --max-steps) at a high learning rate: with 2 machines x 1 device x
    2 pairs, its 32 rows make 8 steps of 4 pairs, the schedule decays over 8 steps, and each
    step's metrics and the final weights are those of 1 process x 4 pairs within the tolerances
    of ``tests.training.conftest`` (float32 sums in another order). Had a machine read the other
    one's rows, the loss and the token count would differ; had --num-nodes been left out of the
    global batch, the run would plan 16 steps and its learning rates would differ."""
    options = dict(max_steps=-1, num_train_epochs=1, learning_rate=5e-3)
    node_dirs = [tmp_path / "node0", tmp_path / "node1"]
    argvs = [
        base_args(tiny_assets, out, strategy="ddp", devices=1, num_nodes=2, batch_size=2, **options)
        for out in node_dirs
    ]
    for node_rank, (code, output) in enumerate(launch_machines(argvs, launcher)):
        assert code == 0, f"node {node_rank}:\n{output[-3000:]}"
        assert f"GLOBAL_RANK: {node_rank}, MEMBER: {node_rank + 1}/2" in output
    single = fit(base_args(tiny_assets, tmp_path / "single", batch_size=4, **options))
    nodes = read_metrics(node_dirs[0])
    assert len(nodes) == len(single.history) == 8
    assert nodes[1]["rewards/margins"] != 0
    assert [r["num_tokens"] for r in nodes] == [r["num_tokens"] for r in single.history]
    assert_steps_close(nodes, single.history, keys=(*STEP_KEYS, "learning_rate"))
    assert_weights_close(node_dirs[0] / "model", single.model_dir, tiny_assets.model_dir)
    assert (node_dirs[0] / "checkpoints" / "last.ckpt").is_file()
    # The other machine keeps only its own reference log-probs cache (each process computes it).
    assert {p.name for p in node_dirs[1].iterdir()} <= {"reference_logps"}
