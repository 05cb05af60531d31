"""Start-up profile of one trial's setup steps, in-process, twice (cold, then warm); output in
setup_prof.log beside it, discussed in docs/benchmarks.md."""
import time, sys
from pathlib import Path
REPO = Path(__file__).resolve().parents[2]
T=time.perf_counter
t=T(); import torch; torch.set_num_threads(1); print("import torch", round(T()-t,2))
t=T(); import transformers; print("import transformers", round(T()-t,2))
t=T(); import ray, ray.train, ray.train.torch; print("import ray.train.torch", round(T()-t,2))
sys.path.insert(0, str(REPO))
from simpo_ray.search.plan import load
from simpo_ray.config import from_dict
space=load(REPO / 'search_spaces' / 'cpu-tiny.yaml')
cfg=from_dict(space.trial_config(space.points_to_evaluate[0]))
t=T(); from simpo_ray.data.tokens import PairCollator, load_prepared, prepare_datasets; from simpo_ray.train.logps import PolicyLogps; from simpo_ray.train.model import load_model, load_tokenizer; print("import simpo_ray modules", round(T()-t,2))
for rep in range(2):
  t=T(); tok=load_tokenizer(cfg); print(rep,"load_tokenizer", round(T()-t,2))
  t=T(); m=load_model(cfg, device="cpu"); print(rep,"load_model", round(T()-t,2))
  t=T(); p=prepare_datasets(cfg, tok); tr=load_prepared(p.train_path); ev=load_prepared(p.eval_path); print(rep,"prepare_datasets+load", round(T()-t,2))
  t=T(); pol=PolicyLogps(m); opt=torch.optim.AdamW(pol.parameters(), lr=1e-3); from transformers import get_scheduler; s=get_scheduler("cosine", opt, num_warmup_steps=6, num_training_steps=60); print(rep,"policy+opt+sched", round(T()-t,2))
  from simpo_ray.train.loop import evaluate
  obj=dict(beta=cfg.beta, gamma_beta_ratio=cfg.gamma_beta_ratio, loss_type=cfg.loss_type, label_smoothing=0.0, sft_weight=cfg.sft_weight)
  col=PairCollator(tok.pad_token_id)
  t=T(); evaluate(pol,pol,tok,ev,col,cfg.replace(generation_eval_samples=0),obj,"cpu",0,1); print(rep,"eval no-gen (256 pairs)", round(T()-t,2))
  from simpo_ray.bundled.evaluate import success_rate
  prompts=[ev[i]["prompt"] for i in range(128)]
  t=T(); success_rate(m,tok,prompts); print(rep,"success_rate 128 prompts", round(T()-t,2))
  t=T(); import tempfile; d=tempfile.mkdtemp(); m.save_pretrained(d+"/model"); tok.save_pretrained(d+"/model"); torch.save({"model":m.state_dict(),"optimizer":opt.state_dict()}, d+"/s.pt"); print(rep,"checkpoint save", round(T()-t,2))
