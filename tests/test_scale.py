"""Processes that see different files under the same path (machines without a shared filesystem, NFS delay)
never hang: either they get rank 0's answer, or every process stops with one line. And the filter's masks do
not depend on the device. (Host memory at scale is measured by benchmarks/bench_scale.py, not here.)"""

import os
import subprocess
import sys

import torch

from betadpo import BetaDPOState, LossArgs, filter_log_weights, filter_mask
from conftest import ROOT, _free_port, run_command, run_here

TINY = ["--config", "configs/sort.yaml", "--data.num_train", 32, "--data.eval_size", 4, "--eval.batch_size", 2,
        "--train.batch_size", 8, "--train.max_steps", 1, "--train.warmup_steps", 0]


def skewed_launch(flag: str, rank0_value, other_value, *args):
    """2 gloo CPU processes of betadpo.py (DDP); rank 1 sees `other_value` for `flag` (tests/skew_launch.py).
    The subprocess timeout turns a hang into a failure."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "_SKEW_FLAG": flag, "_SKEW_VALUE": str(other_value)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(ROOT / "tests" / "skew_launch.py"), "betadpo.py", *map(str, args), flag, str(rank0_value)]
    return run_command(cmd, env, timeout=240, check=False)


def test_an_output_dir_that_is_not_shared_stops_every_process_with_one_line(tmp_path, tiny_model):
    result = skewed_launch("--train.output_dir", tmp_path / "rank0", tmp_path / "rank1", *TINY, "--model.name_or_path", tiny_model)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]  # one line, from rank 0 (rank 1 exits quietly)
    assert "train.output_dir" in errors[0] and "rank 1" in errors[0] and "filesystem all machines mount" in errors[0]
    assert not (tmp_path / "rank1").exists()  # nothing written where rank 1 looked
    assert not list((tmp_path / "rank0").glob("checkpoints/*"))


def test_a_reference_cache_only_rank0_sees_is_used_by_every_process(tmp_path, tiny_model):
    """Rank 0 finds the precomputed reference log-probs in its train.ref_cache_dir, rank 1 finds none in its own: the
    old code had rank 1 score the pairs alone (a collective rank 0 never joined: a hang). Now rank 0's values reach
    rank 1, and rank 1's cache directory stays empty."""
    args = [*TINY, "--model.name_or_path", tiny_model, "--train.precompute_ref", "true"]
    cache, empty = tmp_path / "cache", tmp_path / "empty"
    run_here("betadpo.py", *args, "--train.output_dir", tmp_path / "one", "--train.ref_cache_dir", cache)  # in this process
    assert len(list(cache.glob("*.pt"))) == 2  # train and eval
    result = skewed_launch("--train.ref_cache_dir", cache, empty, *args, "--train.output_dir", tmp_path / "two")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("(cached)") == 2 and not empty.exists()


def test_the_filter_generator_is_on_the_cpu_whatever_the_device():
    """The masks depend on the seed and the margins only: the same draws as a CPU generator of that seed, for a state
    made for any device (on a GPU the old generator lived there, and drew other numbers than a CPU's)."""
    cfg = LossArgs(filter_ratio=0.5)
    for device in ("cpu", "meta"):
        state = BetaDPOState(cfg, 7, device)
        assert state.generator.device.type == "cpu"
    M = torch.tensor([0.3, -1.0, 2.0, 0.1, 0.0, 1.5])
    a = filter_mask(filter_log_weights(M, torch.tensor(0.2), torch.tensor(1.0)), 0.5, BetaDPOState(cfg, 7, "meta").generator)
    u = torch.rand(6, generator=torch.Generator().manual_seed(7))
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))
    expected = (-((M - 0.2) ** 2) / 2 + gumbel).topk(3).indices
    assert a.sum() == 3 and set(a.nonzero().flatten().tolist()) == set(expected.tolist())


def test_the_gpu_check_script_passes_in_its_cpu_mode(tmp_path):
    """benchmarks/gpu_check.sh --cpu: the GPU check's logic (the measured micro-batches plain and FSDP2, bf16 vs
    fp32 log-probs, fast vs plain log-probs, plain vs FSDP2 with resume, precomputed reference, eval.py), tiny, on
    CPU processes (the one-process stages in gpu_check's own, the FSDP2 ones launched); it exits 1 on any
    disagreement."""
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu", "--workdir", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for line in ("0. plain, bf16 autocast:", "0. FSDP2 (1 process), bf16 parameters, fp32 reduce:", "tokens/s, model",
                 "0. precision: cpu bf16 autocast vs CPU fp32", "log-probs fast vs plain", "step 1, plain vs FSDP2", "step 2 (after resume), plain vs FSDP2",
                 "step 1, live vs precomputed reference", "5. eval.py: pref_accuracy", "all checks passed"):
        assert line in result.stdout, result.stdout[-3000:]


def test_the_accelerate_configs_load_and_hsdp_shards_within_a_machine():
    """Every configs/accelerate/*.yaml parses with accelerate's own loader; the HSDP one replicates across its machines
    and shards over the GPUs of one (replicate × shard = num_processes, shard = GPUs per machine)."""
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.name: load_config_from_file(str(p)) for p in (ROOT / "configs" / "accelerate").glob("*.yaml")}
    assert {"ddp.yaml", "fsdp.yaml", "fsdp_2machines.yaml", "hsdp_2machines.yaml"} <= set(configs)
    for name, c in configs.items():
        if c.distributed_type.name == "FSDP":
            assert c.fsdp_config["fsdp_version"] == 2 and c.fsdp_config["fsdp_cpu_ram_efficient_loading"], name
    hsdp = configs["hsdp_2machines.yaml"]
    replicate = hsdp.parallelism_config["parallelism_config_dp_replicate_size"]
    shard = hsdp.parallelism_config["parallelism_config_dp_shard_size"]
    assert replicate == hsdp.num_machines and replicate * shard == hsdp.num_processes


ALLOCATOR_PROBE = """
import ctypes, sys
if sys.argv[1] == "pinned":
    import plumbing.host_allocator
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
rss = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024  # MiB
MiB = 1 << 20
libc.free(libc.malloc(8 * MiB))  # on glibc's defaults this raises the mmap threshold to 8 MiB
blocks = [libc.malloc(4 * MiB) for _ in range(32)]  # 128 MiB, then touched (what torch does with a tensor)
for b in blocks:
    ctypes.memset(b, 1, 4 * MiB)
held = rss()
for b in blocks[:-1]:  # all freed but the last, which keeps an arena's top (glibc trims heaps from the top only)
    libc.free(b)
print(held - rss())
"""


def test_the_scripts_set_glibc_malloc_up_before_torch_loads():
    """plumbing/host_allocator.py, imported by sft/betadpo/eval before torch: freed tensors go back to the system.
    The probe frees 124 MiB of 4 MiB blocks after one 8 MiB block was freed: on glibc's defaults the rising mmap
    threshold put them on the heap, which keeps them (RSS falls by ~0); with the module, each was its own mapping."""
    import ast

    released = {}
    for mode in ("default", "pinned"):
        out = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE, mode], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        released[mode] = int(out.stdout)
    assert released["default"] < 16 and released["pinned"] > 100, released
    for script in ("betadpo.py", "sft.py", "eval.py"):
        imports = [n for n in ast.parse((ROOT / script).read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [n.names[0].name if isinstance(n, ast.Import) else n.module for n in imports]
        assert names.index("plumbing.host_allocator") < names.index("torch"), script
