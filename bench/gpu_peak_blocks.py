"""What is live at the peak of a DDP arm of bench/gpu_check.py, alone in its process (CUDA memory
history replayed; blocks grouped by size, as stacks cannot be recorded from the backward thread).

    PYTHONPATH=. python3 bench/gpu_peak_blocks.py 1b     # or 3b; needs a GPU
"""
import collections, sys
sys.path.insert(0, "bench")
import torch, torch.distributed as dist
import gpu_check as g
shape = sys.argv[1] if len(sys.argv) > 1 else "1b"
device = torch.device("cuda", 0); torch.cuda.set_device(device)
g._init_process_group(device)
batch = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 16, "max_length": 1024, "max_prompt_length": 512}
config = g._llama_config(shape, 1024)
policy, n = g.build("ddp", config, device, bf16=True, checkpointing=True)
P = g._project()
batches = g.make_batches(config.vocab_size, 2, 1024, 512, 16, device, P.IGNORE_INDEX)
torch.cuda.reset_peak_memory_stats()
torch.cuda.memory._record_memory_history(enabled="all", context=None, max_entries=2000000)
g.train_steps(policy, "ddp", batches, device, bf16=True, lr=1e-6, steps=1, warmup=1, deadline=1e18)
snap = torch.cuda.memory._snapshot()
torch.cuda.memory._record_memory_history(enabled=None)
print("peak allocated GB", torch.cuda.max_memory_allocated() / 1e9)
events = snap["device_traces"][0]
live, cur, peak, peak_live = {}, 0, 0, None
base = sum(b["size"] for seg in snap["segments"] for b in seg["blocks"] if b["state"] == "active_allocated")
for e in events:
    if e["action"] == "alloc":
        live[e["addr"]] = e; cur += e["size"]
    elif e["action"] in ("free_completed",):
        x = live.pop(e["addr"], None)
        if x: cur -= x["size"]
    if cur > peak:
        peak, peak_live = cur, dict(live)
print("replayed peak GB (allocs during history)", peak / 1e9, "entries", len(events))
groups = collections.Counter()
for e in peak_live.values():
    groups[e["size"]] += e["size"]
for k, v in groups.most_common(18):
    print(f"{v/1e9:7.3f} GB  blocks of {k} bytes ({k / 4:.0f} fp32 / {k / 2:.0f} bf16 elements) x {v // k}")
dist.destroy_process_group()
