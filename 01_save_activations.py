"""Stage 01: run the dataset through the model and save one layer's activations.

    python 01_save_activations.py                      # the local preset (embedded model and corpus)
    python 01_save_activations.py --preset=bielik      # the specification's Bielik-1.5B run
    python 01_save_activations.py --list-layers        # every layer name of the model, and the transcoder pairs
    python 01_save_activations.py --TRAIN_TARGET=transcoder   # the MLP's output stored beside its input
    python 01_save_activations.py --ACTIVATION_SOURCE=model   # only the held-out documents; stage 02 makes the rest

Writes store/runs/<run_id>/ (shards + metadata.json) and, last, store/run_id.txt.
Under torchrun (torchrun --nproc_per_node=N 01_save_activations.py) each process embeds a share.
"""
import itertools
import sys

from saekit.activations.data import check_roles_readable, open_role_texts, texts_line
from saekit.activations.models import layer_names, resolve_layer, transcoder_pairs, weights_identity
from saekit.activations.sources import count_training_texts
from saekit.activations.stage import load_stage_model, record_settings, stage_runtime, start_stage
from saekit.activations.store import excluded_token_ids, open_run, role_token_ids, save_activations
from saekit.base.distributed import leave_world
from saekit.base.memory import check_fits, forward_parts

settings, flags = start_stage("01 save activations", sys.argv[1:], {"list-layers"})
device, world = stage_runtime(settings)  # under torchrun, each process embeds a share of the texts
model, tokenizer = load_stage_model(settings, device, world)

if "list-layers" in flags:
    print("\n".join(layer_names(model)))
    print("\ntranscoder pairs (TRAIN_TARGET='transcoder'): LAYER_SIGNATURE -> its default TARGET_SIGNATURE, the "
          "block's MLP\n" + "\n".join(f"  {layer} -> {target}" for layer, target in transcoder_pairs(model)))
    sys.exit(0)
resolve_layer(model, settings.LAYER_SIGNATURE)  # fail on a wrong layer before reading any data
if settings.target is not None:
    resolve_layer(model, settings.target, "TARGET_SIGNATURE")
check_roles_readable(settings)  # a wrong EVAL_SPLIT stops here, not at stage 03 after training
forward = forward_parts(model, settings.BATCH_SIZE_SAVE * settings.MAX_LENGTH, settings.MAX_LENGTH)
check_fits("stage 01's forward", forward, device, "Lower BATCH_SIZE_SAVE (or MAX_LENGTH).")

texts = open_role_texts(settings, "train")  # read as it is embedded: memory stays flat however many texts
metadata = {"model_id": settings.MODEL_ID, "dataset": settings.HF_DATASET, "split": texts.read_from.get("split"),
            "texts_read": texts.read_from, "n_texts_asked": settings.DATA_LIMIT, "source": texts.source,
            "text_field": settings.TEXT_FIELD, "device": str(device),
            "layer_module": layer_names(model)[settings.LAYER_SIGNATURE],  # SAELens's hook name for it (02)
            "model_weights": weights_identity(settings.MODEL_ID, model),  # checked by stage 02 on the fly
            "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "settings": settings.as_dict()}
on_the_fly = {}
if settings.ACTIVATION_SOURCE == "model":  # stage 02 makes the training rows itself: count them, save the rest
    plan, left_out = count_training_texts(texts, tokenizer, settings.MAX_LENGTH, settings.HELDOUT_FRACTION,
                                          progress=world.is_main,
                                          excluded=excluded_token_ids(settings.EXCLUDE_TOKENS, role_token_ids(tokenizer)))
    metadata.update(rows="heldout", training_documents=plan.n_training, training_tokens=plan.n_tokens,
                    training_copies_of_heldout=left_out, skipped_empty=texts.skipped_empty)
    on_the_fly = {"document_offset": plan.n_training, "hashes_before": plan.hashes[:plan.n_training].tolist()}
    texts = list(itertools.islice(texts, plan.n_training, None))
    if world.is_main:
        print(f"{plan.n_training} training texts ({plan.n_tokens} tokens) for stage 02 to embed on the fly"
              + (f", {left_out} of them left out as copies of held-out texts" if left_out else "")
              + f"; saving the {len(texts)} held-out ones")
run_dir = save_activations(
    model, tokenizer, texts, settings.LAYER_SIGNATURE, settings.store,
    max_length=settings.MAX_LENGTH, batch_size=settings.BATCH_SIZE_SAVE,
    dtype=settings.ACTIVATION_DTYPE, shard_tokens=settings.SHARD_TOKENS, metadata=metadata,
    progress=world.is_main, world=world, target_signature=settings.target, **on_the_fly,
)
if world.is_main:
    record_settings(settings, "01_save_activations")
    meta = open_run(settings.store).meta
    done = "read" if settings.ACTIVATION_SOURCE == "model" else "embedded"  # on the fly, the held-out ones only
    print(f"{done} " + texts_line(meta["n_documents"], settings.DATA_LIMIT, metadata["source"], meta["skipped_empty"]))
    cut = meta["cut_at_max_length"]
    if cut["texts"]:
        print(f"{cut['texts']} texts were longer than MAX_LENGTH = {settings.MAX_LENGTH} tokens and were cut: "
              f"{cut['their_tokens_dropped']} of their tokens ({cut['share_of_their_tokens_dropped']:.0%}) were "
              "dropped. Raise MAX_LENGTH, or split long documents into several texts, to keep them")
    print(f"saved activations to {run_dir} ({world.size} process{'es' * (world.size > 1)}); "
          f"{settings.store / 'run_id.txt'} names it")
leave_world(world)
