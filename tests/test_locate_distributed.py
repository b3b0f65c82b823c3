"""Under `accelerate launch` with 2 CPU processes every rank returns the circuit of a single-process run.

`accelerate launch --cpu --num_processes 2` starts a single process unless MPI is installed (it only launches several
CPU processes through mpirun), so the test uses the torchrun-based launcher (`--multi_gpu`), which on a machine
without a GPU starts 2 CPU processes with a CPU (gloo) process group.
"""

import json
import os
import subprocess
import textwrap

import pytest
import torch
from conftest import make_model, two_process_launch
from test_locate import assert_same_circuit, calibration_batches

from headmap_peft import Circuit, locate_circuit
from headmap_peft.locate import ablation_table

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM
    from headmap_peft import locate_circuit
    from headmap_peft.locate import ablation_table

    model_dir, batches_file, out_dir = sys.argv[1:4]
    state = PartialState()
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    batches = torch.load(batches_file)
    rows = []  # sequences this process ran through the model
    model.register_forward_pre_hook(lambda m, a, k: rows.append(k["input_ids"].shape[0]), with_kwargs=True)
    exact = locate_circuit(model, batches, 2, progress=False)
    exact_rows = sum(rows)
    attribution = locate_circuit(model, batches, 2, method="attribution", progress=False)
    ablation = ablation_table(model, batches, exact, draws=2, seed=3)
    rank, world = dist.get_rank(), dist.get_world_size()
    exact.save(f"{out_dir}/exact{rank}.json")
    attribution.save(f"{out_dir}/attribution{rank}.json")
    with open(f"{out_dir}/info{rank}.json", "w") as f:
        json.dump({"world": world, "exact_rows": exact_rows,
                   "ablation": [[r.loss, r.accuracy, r.loss_std or 0.0] for r in ablation]}, f)
    """
)


def test_two_processes_give_the_single_process_circuit(tmp_path):
    torch.set_num_threads(1)
    model = make_model("llama", seed=6)
    model.save_pretrained(tmp_path / "model")
    batches = calibration_batches(seed=7, sizes=(3, 2, 4))  # 3 batches: rank 0 takes batches 0 and 2, rank 1 batch 1
    torch.save(batches, tmp_path / "batches.pt")
    (tmp_path / "script.py").write_text(SCRIPT)
    command = [
        *two_process_launch(tmp_path / "script.py"),
        str(tmp_path / "model"),
        str(tmp_path / "batches.pt"),
        str(tmp_path),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-4000:]

    exact = locate_circuit(model, batches, 2, progress=False)
    attribution = locate_circuit(model, batches, 2, method="attribution", progress=False)
    ablation = ablation_table(model, batches, exact, draws=2, seed=3)
    infos = [json.loads((tmp_path / f"info{rank}.json").read_text()) for rank in (0, 1)]
    assert [info["world"] for info in infos] == [2, 2]
    for rank in (0, 1):
        assert_same_circuit(Circuit.load(tmp_path / f"exact{rank}.json"), exact)
        assert_same_circuit(Circuit.load(tmp_path / f"attribution{rank}.json"), attribution)
        for got, row in zip(infos[rank]["ablation"], ablation, strict=True):
            assert got == pytest.approx([row.loss, row.accuracy, row.loss_std or 0.0], rel=1e-6, abs=1e-9)
    # each process evaluated only its shard: rank 0 has 3 + 4 sequences, rank 1 has 2
    assert infos[0]["exact_rows"] / infos[1]["exact_rows"] == pytest.approx(7 / 2)
