import pytest

from hgf.config import SIZES, Config, ConfigError, config_from_dict, load_config, replace


def _write(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_precedence_cli_over_toml_over_size_over_defaults(tmp_path):
    p = _write(tmp_path, '[model]\nsize = "tiny"\nd_model = 96\nn_heads = 4\n[train]\nlr = 0.002\n')
    cfg = load_config(p, ["--train.lr=0.003", "--model.n_layers", "3"])
    assert cfg.model.d_model == 96  # TOML over size
    assert cfg.model.d_ff == SIZES["tiny"]["d_ff"]  # size over defaults
    assert cfg.model.n_layers == 3 and cfg.train.lr == 0.003  # CLI over TOML
    assert cfg.train.batch_size == Config().train.batch_size  # defaults


def test_round_trip_through_dict_and_toml(tmp_path):
    cfg = load_config("configs/hgf.toml", ["--model.size=small"])
    assert config_from_dict(cfg.to_dict()) == cfg
    assert load_config(_write(tmp_path, cfg.to_toml())) == cfg


def test_replace_validates():
    cfg = load_config("configs/hgf.toml")
    assert replace(cfg, train={"steps": 5}).train.steps == 5
    with pytest.raises(ConfigError):
        replace(cfg, hgf={"rank": 0})


@pytest.mark.parametrize("toml,over,message", [
    ('[model]\nd_model = 64\nn_heads = 6\n', [], r"c\.toml: model\.n_heads=6: must divide model\.d_model=64"),
    ('[model]\nlinear = "hgf"\n[hgf]\nrank = 0\n', [], r"c\.toml: hgf\.rank=0: must be > 0"),
    ('[model]\nlinear = "hgf"\n[hgf]\ngate_init = 1.2\n', [], r"c\.toml: hgf\.gate_init=1\.2: must lie in \(0, 1\) for a sigmoid gate"),
    ('[model]\nlinear = "hgf"\n', ["--hgf.gate=tanh", "--hgf.gate_init=-1"], r"command line: hgf\.gate_init=-1\.0: must lie in \(-1, 1\)"),
    ('[model]\nwidth = 3\n', [], r"c\.toml: unknown key model\.width"),
    ('[modle]\nd_model = 3\n', [], r"c\.toml: unknown section \[modle\]"),
    ('[train]\nsteps = "many"\n', [], r"c\.toml: train\.steps must be int, got str 'many'"),
    ('[train]\ncompile = 3\n', [], r"c\.toml: train\.compile must be bool"),
    ('[model]\nlinear = "int4"\n', [], r"c\.toml: model\.linear='int4': must be one of dense, bitlinear, hgf"),
    ('[model]\nsize = "huge"\n', [], r"c\.toml: model\.size='huge' is not one of"),
    ('[model]\nattention = "differential"\nn_heads = 2\nd_model = 64\n', ["--model.n_heads=1"],
     r"command line: model\.n_heads=1: must divide|must be even"),
    ('[train]\nseq_len = 4096\n', [], r"c\.toml: train\.seq_len=4096: exceeds model\.max_seq_len"),
    ('[model\nx=1', [], r"c\.toml: malformed TOML"),
    ('', ["--train.lr"], r"command line: --train\.lr needs a value"),
    ('', ["train.lr=3"], r"command line: expected --section\.key=value"),
])
def test_bad_config_gives_one_line_error(tmp_path, toml, over, message):
    p = _write(tmp_path, toml)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(p, over)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
