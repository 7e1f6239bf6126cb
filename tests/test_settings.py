import pytest

from saekit.base.settings import SettingsError, load_settings


def test_defaults_are_the_local_preset():
    s = load_settings([])
    assert s.PRESET == "local"
    assert s.MODEL_ID == "embedded" and s.HF_DATASET == "embedded"
    assert s.LAYER_SIGNATURE.endswith("_15_post_attention_layernorm")


def test_bielik_preset_has_the_specification_values():
    s = load_settings(["--preset=bielik"])
    assert s.MODEL_ID == "speakleash/Bielik-1.5B-v3.0-Instruct"
    assert s.HF_DATASET == "roneneldan/TinyStories"
    assert s.LAYER_SIGNATURE == "llamaforcausallm_model_layers_16_post_attention_layernorm"
    assert (s.N_LATENTS_MULTIPLIER, s.TOP_K, s.EPOCHS, s.BATCH_SIZE_TRAIN, s.DATA_LIMIT) == (4, 8, 100, 1024, 1000)


def test_command_line_overrides_win_over_the_preset():
    s = load_settings(["--preset=bielik", "--TOP_K=16", "--LR=3e-4", "--DEVICE=cpu"])
    assert s.TOP_K == 16 and s.LR == 3e-4 and s.DEVICE == "cpu"


def test_int_is_accepted_for_a_float_setting():
    assert load_settings(["--LR=1"]).LR == 1.0


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(SettingsError, match="(?s)unknown setting 'TOPK'.*Valid keys:.*TOP_K"):
        load_settings(["--TOPK=3"])


def test_wrong_type_names_the_expected_type():
    with pytest.raises(SettingsError, match="(?s)TOP_K must be a int.*Valid keys"):
        load_settings(["--TOP_K=eight"])
    with pytest.raises(SettingsError, match="TOP_K must be a int"):
        load_settings(["--TOP_K=True"])


def test_unknown_preset():
    with pytest.raises(SettingsError, match="unknown preset 'nope'.*local, bielik"):
        load_settings(["--preset=nope"])


def test_preset_file(tmp_path):
    preset = tmp_path / "mine.py"
    preset.write_text("TOP_K = 4\nEPOCHS = 2\n")
    s = load_settings([f"--preset={preset}"])
    assert (s.TOP_K, s.EPOCHS) == (4, 2)


def test_notebooks_read_overrides_from_the_environment(monkeypatch):
    monkeypatch.setenv("SAE_ARGS", "--TOP_K=12 --STORE_DIR=/tmp/x")
    s = load_settings()
    assert s.TOP_K == 12 and str(s.store) == "/tmp/x"


def test_matryoshka_groups_are_fractions_summing_below_one():
    assert load_settings(["--MATRYOSHKA_GROUP_FRACTIONS=(0.1, 0.3)"]).MATRYOSHKA_GROUP_FRACTIONS == (0.1, 0.3)
    for wrong in ("(0.5, 0.5)", "(0.0, 0.2)", "(0.2, 1.5)", "('a',)"):
        with pytest.raises(SettingsError, match="MATRYOSHKA_GROUP_FRACTIONS=.* must be a tuple of fractions in \\(0, 1\\) "
                                                "summing to less than 1"):
            load_settings([f"--MATRYOSHKA_GROUP_FRACTIONS={wrong}"])
