"""Stage 02: train an SAE (TopK; BatchTopK: --ARCHITECTURE=batchtopk; Matryoshka BatchTopK:
--ARCHITECTURE=matryoshka) on a layer's activations: those saved by stage 01, or, with
--ACTIVATION_SOURCE=model, made by the model as training goes.

    python 02_train_sae.py                  # settings from config.py
    python 02_train_sae.py --TOP_K=16       # any setting, per run
    python 02_train_sae.py --resume         # continue an interrupted run from its last checkpoint
    torchrun --nproc_per_node=N 02_train_sae.py   # data parallel over N processes (GPUs, or CPU with gloo)

Writes store/sae_model/topk_sae.pt and store/training_history.json (each atomically; the history
names the SAE by its checksum, so a reader can tell a matched pair), and a checkpoint after every
epoch and every CHECKPOINT_SECONDS (store/sae_model/checkpoint.pt); the SAE also in SAELens's format
(store/sae_model/saelens/: cfg.json + sae_weights.safetensors; BatchTopK and Matryoshka as the JumpReLU
SAELens makes of them). Every file loads without running code.

With SWEEP (a list of variants: TOP_K, N_LATENTS_MULTIPLIER, ARCHITECTURE, LR), every SAE of it is
trained on the same batches, read or made once, and saved in store/sweep/<name>/ (topk_sae.pt,
training_history.json, saelens/); one checkpoint, store/sweep_checkpoint.pt, holds them all.
"""
import shutil
import sys

from saekit.activations.models import public_model_id, weights_identity
from saekit.activations.sources import model_rows, store_rows
from saekit.activations.stage import load_stage_model, record_settings, stage_runtime, start_stage
from saekit.activations.store import check_run_matches, check_same_weights, open_run
from saekit.base.distributed import leave_world
from saekit.base.integrity import write_sealed_json
from saekit.training.saelens_format import SAELensFormatError, saelens_hook_name, save_saelens
from saekit.training.sweep import CHECKPOINT_FILE, history_path, sae_folder, sweep_variants, train_sweep
from saekit.training.train import TrainConfig, train_sae

settings, flags = start_stage("02 train SAE", sys.argv[1:], {"resume"})
device, world = stage_runtime(settings)  # under torchrun: data parallel, each process a share of each batch
run = open_run(settings.store)
check_run_matches(run, settings.MODEL_ID, settings.LAYER_SIGNATURE, settings.target)
run.exclude_tokens(settings.EXCLUDE_TOKENS)  # out of the training rows and the held-out metrics
if settings.ACTIVATION_SOURCE == "model":
    model, tokenizer = load_stage_model(settings, device, world)
    check_same_weights(run, weights_identity(settings.MODEL_ID, model))  # the model stage 01 read, unchanged
    source = model_rows(settings, run, model, tokenizer, device, world)
else:
    source = store_rows(settings, run, device)
if world.is_main:
    print(f"training on {source.describe()}; held-out rows from run {run.run_id} ({run.meta['dtype']}, "
          f"d = {run.d_model}); on {device} in {world.size} process{'es' * (world.size > 1)}")
    if source.kind == "model" and settings.EPOCHS > 1:
        print(f"note: each of the {settings.EPOCHS} epochs runs the model again over the {source.n_rows} training "
              "tokens (ACTIVATION_SOURCE='store' embeds them once)")



WHAT = {"sae": "SAE", "transcoder": "transcoder", "skip_transcoder": "skip transcoder"}[settings.TRAIN_TARGET]


def publish(sae, record: dict, name: str | None = None) -> None:
    """The SAE, its history and its SAELens folder, in stage 02's paths (a sweep's under store/sweep/<name>/)."""
    folder = sae_folder(settings.store, name)
    provenance = {"layer_signature": run.meta["layer_signature"], "model_id": run.meta["model_id"],
                  "activation_run_id": run.run_id, "activation_source": record["activation_source"],
                  "input_scale": record["input_scale"], "heldout_start_row": record["heldout_start_row"],
                  "train_target": settings.TRAIN_TARGET, "target_signature": settings.target,
                  "settings": settings.as_dict(), **({"sweep_name": name} if name else {})}
    sae_id = sae.save(folder / "topk_sae.pt", **provenance, init=record.pop("init"))
    write_sealed_json(history_path(settings.store, name), {**provenance, "sae_id": sae_id, **record})
    # the same SAE as SAELens reads it (sae_lens.SAE.load_from_disk), for use outside this project
    saelens_extra = {"hook_name_out": saelens_hook_name(settings.target)} if settings.target else {}
    try:
        save_saelens(sae, folder / "saelens", public_model_id(run.meta["model_id"]),
                     saelens_hook_name(run.meta["layer_signature"], run.meta.get("layer_module")),
                     {**provenance, "sae_id": sae_id, **saelens_extra})
        saelens_line = f" and, in SAELens's format, {folder / 'saelens'}"
    except SAELensFormatError as err:  # a format SAELens lacks: the SAE itself is saved; an older export must not stay
        shutil.rmtree(folder / "saelens", ignore_errors=True)
        saelens_line = f"; not in SAELens's format: {err}"
    final = record["history"][-1]
    of_target = f" of the target {settings.target} (its prediction from {settings.LAYER_SIGNATURE})" if settings.target else ""
    print(f"{name + ': ' if name else ''}held-out FVU{of_target} {final['heldout_fvu']:.3f} "
          f"(R^2 {final['heldout_r2']:.3f}), L0 {final['heldout_l0']:.2f}, dead {final['heldout_dead']}/{record['n_latents']}, "
          f"dense {final['heldout_dense']}, {final['tokens_per_s']:.0f} tokens/s")
    print(f"saved the {WHAT} to {folder / 'topk_sae.pt'}, {history_path(settings.store, name)}{saelens_line}")


resume = "resume" in flags
if settings.SWEEP:
    variants = sweep_variants(settings)
    if world.is_main:
        print(f"sweep of {len(variants)} SAEs on the same batches: {', '.join(v.name for v in variants)}")
    trained = train_sweep(run, variants, checkpoint_path=settings.store / CHECKPOINT_FILE, resume=resume,
                          device=device, progress=world.is_main, world=world, source=source)
else:
    trained = {None: train_sae(run, TrainConfig.from_settings(settings), resume=resume, device=device,
                               checkpoint_path=sae_folder(settings.store) / "checkpoint.pt", progress=world.is_main,
                               world=world, source=source)}
if world.is_main:  # rank 0 writes the artifacts while the others wait in leave_world
    for name, (sae, record) in trained.items():
        publish(sae, record, name)
    record_settings(settings, "02_train_sae")
    if settings.SWEEP:
        print("stage 03 compares them and chooses the one stages 04-05 read (or set SWEEP_CHOICE)")
leave_world(world)
