"""Config: defaults, YAML + overrides, and validation messages that name the key and what is allowed."""

import re
from pathlib import Path

import pytest

from kdray.config import Config, fingerprint, from_dict, load_config, replace, to_dict
from kdray.errors import ConfigError

CONFIGS = sorted(Path(__file__).parent.parent.glob("configs/*.yaml"))


def test_defaults_are_valid_and_round_trip():
    cfg = load_config()
    assert cfg == Config()
    assert from_dict(to_dict(cfg)) == cfg
    assert cfg.select_metric == "ndcg@10"


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name != "serve.yaml"], ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    try:
        cfg = load_config(path)
    except ConfigError as e:  # a data set the user must bring: the config says so, and loads once given the path
        assert "data.path" in str(e)
        cfg = load_config(path, ["data.path=/data/" + path.stem])
    assert cfg.name == path.stem
    assert from_dict(to_dict(cfg)) == cfg


def test_overrides_parse_yaml_values_and_take_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("student:\n  dim: 8\ndistill:\n  alpha: 0.2\n")
    cfg = load_config(f, ["student.dim=32", "teacher.hidden=[64, 32]", "distill.mask_seen=false"])
    assert cfg.student.dim == 32
    assert cfg.teacher.hidden == (64, 32)
    assert cfg.distill.alpha == 0.2 and cfg.distill.mask_seen is False
    assert cfg.teacher.name == "mf" and cfg.teacher.dim == 256  # untouched keys keep their defaults


def test_replace_validates():
    cfg = replace(Config(), **{"student.dim": 8})
    assert cfg.student.dim == 8
    with pytest.raises(ConfigError, match="distill.alpha"):
        replace(cfg, **{"distill.alpha": 1.5})


@pytest.mark.parametrize(
    "override, message",
    [
        ("lr=0.1", "unknown key lr; allowed keys: data, device"),
        ("student.size=3",
         "unknown key student.size; allowed keys in student: cosine_temperature, dim, dropout, hidden, name"),
        ("teacher.cosine_temperature=0.1",
         r"teacher.cosine_temperature: 0.1 is a lightgcn option \(teacher.name is 'mf'\); leave it at 0"),
        ("student.cosine_temperature=-1", "student.cosine_temperature: -1.0 must be >= 0"),
        ("distill.alpha=1.5", r"distill.alpha: 1.5 must be in \[0, 1\]"),
        ("distill.alpha=-0.1", r"distill.alpha: -0.1 must be in \[0, 1\]"),
        ("distill.temperature=0", "distill.temperature: 0.0 must be > 0"),
        ("eval.ks=[0, 10]", "eval.ks: .* must be positive"),
        ("distill.topk=0", "distill.topk: 0 must be > 0"),
        ("data.split_ratios=[0.7, 0.1, 0.1]", "must sum to 1, they sum to 0.9"),
        ("data.split_ratios=[0.8, 0.2]", "expected a list of 3 values"),
        ("student.dim=512", "student.dim: 512 is larger than teacher.dim 256; set distill.allow_larger_student"),
        ("student.name=xgboost",
         "student.name: 'xgboost' is not allowed; allowed values: 'mf', 'neumf', 'two_tower', 'lightgcn', 'dcnv2', 'mlp', 'fm'$"),
        ("distill.loss=kd", "allowed values: 'none', 'kl', 'mse', 'rd', 'soft_bce', 'rrd', 'listwise'$"),
        ("student_train.epochs=two", "student_train.epochs: expected an integer, got 'two'"),
        ("student_train.epochs=1.5", "student_train.epochs: expected an integer"),
        ("student_train.lr=-1", "student_train.lr: -1.0 must be > 0"),
        ("distill.mask_seen=3", "distill.mask_seen: expected true or false"),
        ("data.source=ml-1m", "data.path: required for data.source='ml-1m'"),
        ("data.split=given", "data.split: 'given' needs a source with its own split"),
        ("distill.n_teachers=0", "distill.n_teachers: 0 must be >= 1"),
        ("distill.teacher_weights=[1.0]", "1 weights for 1 teachers|teacher_weights"),
        ("serve.max_ongoing_requests=4", "serve.max_ongoing_requests: 4 must be >= serve.max_batch_size"),
        ("name=a/b", "name: 'a/b' must be a non-empty directory name"),
        ("student_train=3", "student_train: expected a mapping"),
        ("broken", "expected key=value"),
    ],
)
def test_validation_names_the_key(override, message):
    if override == "distill.teacher_weights=[1.0]":
        one = "distill.n_teachers=1"
        assert load_config(None, [one, override]).distill.teacher_weights == (1.0,)  # 1 weight, 1 teacher: valid
        with pytest.raises(ConfigError, match="2 weights for 1 teachers"):
            load_config(None, [one, "distill.teacher_weights=[1.0, 2.0]"])
        return
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_alpha_edges_and_none_loss():
    assert load_config(None, ["distill.alpha=0"]).distill.alpha == 0.0
    assert load_config(None, ["distill.alpha=1"]).distill.alpha == 1.0
    with pytest.raises(ConfigError, match="must be 0 when distill.loss is 'none'"):
        load_config(None, ["distill.loss=none"])
    assert load_config(None, ["distill.loss=none", "distill.alpha=0"]).distill.loss == "none"


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_config(listy)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("distill:\n  alpah: 0.3\n")
    with pytest.raises(ConfigError, match="wrong.yaml: unknown key distill.alpah"):
        load_config(wrong)


def test_configs_are_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.student.dim = 3  # type: ignore[misc]


def test_fingerprint_is_stable_and_sensitive():
    a, b = Config(), replace(Config(), **{"data.seed": 1})
    assert fingerprint(a.data) == fingerprint(Config().data)
    assert fingerprint(a.data) != fingerprint(b.data)


def test_a_key_added_later_leaves_earlier_fingerprints_alone():
    # teachers and studies keyed before teacher.cosine_temperature existed keep their keys while it is 0
    cfg = load_config(None, ["teacher.name=lightgcn"])
    before = {k: v for k, v in to_dict(cfg.teacher).items() if k != "cosine_temperature"}
    assert fingerprint(cfg.teacher) == fingerprint(before)
    assert fingerprint({"parts": [to_dict(cfg.teacher)]}) == fingerprint({"parts": [before]})  # nested, as stage keys
    cosine = replace(cfg, **{"teacher.cosine_temperature": 0.1})
    assert fingerprint(cosine.teacher) != fingerprint(cfg.teacher)


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 reads 1e-3 as a string; a user typing it means the number
    assert load_config(None, ["student_train.lr=1e-3"]).student_train.lr == 1e-3
    f = tmp_path / "c.yaml"
    f.write_text("teacher_train:\n  lr: 3e-3\n")
    assert load_config(f).teacher_train.lr == 3e-3


def test_names_come_from_the_registries(monkeypatch):
    # registering a model or a loss is all it takes for the config to accept its name
    from kdray.distill import losses
    from kdray.models import MODELS, MF
    from kdray.train import objective

    overrides = ["student.name=toy_model", "distill.loss=toy_kd", "student_train.hard_loss=toy_hard"]
    with pytest.raises(ConfigError, match="student.name: 'toy_model' is not allowed"):
        load_config(None, overrides)
    monkeypatch.setitem(MODELS, "toy_model", MF)
    monkeypatch.setattr(losses, "DISTILL_LOSSES", (*losses.DISTILL_LOSSES, "toy_kd"))
    monkeypatch.setattr(objective, "HARD_LOSSES", (*objective.HARD_LOSSES, "toy_hard"))
    cfg = load_config(None, overrides)
    assert (cfg.student.name, cfg.distill.loss, cfg.student_train.hard_loss) == ("toy_model", "toy_kd", "toy_hard")


def test_init_from_teacher_asks_the_model_family():
    with pytest.raises(ConfigError, match="distill.init_from_teacher: .*student.name='neumf'.*'mf', 'two_tower'"):
        load_config(None, ["student.name=neumf"])
    assert load_config(None, ["student.name=neumf", "distill.init_from_teacher=false"]).student.name == "neumf"
    assert load_config(None, ["teacher.name=neumf"]).teacher.name == "neumf"  # any registered teacher gives vectors


def test_cached_topk_needs_mask_seen():
    # the cache holds the teacher's top-K unobserved items, so it cannot honour mask_seen=false
    with pytest.raises(ConfigError, match="distill.cached_topk: .*distill.mask_seen=true"):
        load_config(None, ["distill.cached_topk=true", "distill.mask_seen=false"])
    assert load_config(None, ["distill.cached_topk=true"]).distill.mask_seen is True


def test_cached_topk_feeds_only_the_losses_that_read_the_top_k_order():
    assert load_config(None, ["distill.cached_topk=true", "distill.loss=rrd"]).distill.loss == "rrd"
    with pytest.raises(ConfigError, match=r"distill.cached_topk: .*\(rd, rrd\).* not 'listwise'"):
        load_config(None, ["distill.cached_topk=true", "distill.loss=listwise"])


@pytest.mark.parametrize("override, message", [
    ("student_train.lr=true", "student_train.lr: expected a number, got True"),
    ("student_train.lr=.inf", "student_train.lr: expected a finite number, got inf"),
    ("student_train.epochs=" + "9" * 30, r"student_train.epochs: 9+ is out of range; expected an integer in \[-2\*\*63"),
    ("teacher.hidden=[64, -1]", r"teacher.hidden: \[64, -1\] must be positive widths"),
    ("data.split_ratios=[0.9, -0.1, 0.2]", r"data.split_ratios\[1\]: -0.1 must be >= 0"),
    ("data.split=zz", "data.split: 'zz' is not allowed; allowed values: 'random', 'loo' or 'given'"),
    ("serve.port=0", "serve.port: 0 must be in 1..65535"),
])
def test_type_and_range_messages(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_study_teacher_is_one_directory_a_list_of_them_or_none():
    assert load_config(None, ["study.teacher=/runs/a/teacher"]).study.teacher == ("/runs/a/teacher",)
    assert load_config(None, ["study.teacher=[/runs/a/teacher, /runs/b/teacher]"]).study.teacher == (
        "/runs/a/teacher", "/runs/b/teacher")
    assert load_config().study.teacher == ()
    assert from_dict({"study": {"teacher": ""}}).study.teacher == ()  # how configs wrote "none" before the list
    with pytest.raises(ConfigError, match=r"study.teacher: \['/a', '/a'\] must be distinct"):
        load_config(None, ["study.teacher=[/a, /a]"])
    with pytest.raises(ConfigError, match=r"study.teacher\[0\]: expected a string, got 3"):
        load_config(None, ["study.teacher=[3]"])


POINTWISE = ["task=pointwise", "data.source=ml-100k", "data.path=/data/ml-100k", "teacher.name=dcnv2",
             "teacher.dim=16", "student.name=fm", "student.dim=8", "distill.loss=soft_bce",
             "distill.init_from_teacher=false"]


def test_pointwise_task_selects_on_auc_and_checks_its_keys():
    cfg = load_config(None, POINTWISE)
    assert cfg.select_metric == "auc" and cfg.pointwise.heads == ("like",)
    assert load_config(None, [*POINTWISE, "pointwise.heads=[like, rating]"]).pointwise.heads == ("like", "rating")


@pytest.mark.parametrize("extra, message", [
    (["teacher.name=neumf"], "teacher.name: 'neumf' is not allowed for task='pointwise'; allowed values: 'dcnv2'"),
    (["distill.loss=rd"], "distill.loss: 'rd' is a ranking loss"),
    (["data.source=synthetic", "data.path=null"], "data.source: 'synthetic' has no features"),
    (["pointwise.heads=[rating]"], "pointwise.heads: ['rating'] must be distinct heads including 'like'"),
    (["pointwise.heads=[like, rating]", "pointwise.task_weights={like: 1.0}"],
     "pointwise.task_weights: no weight for head 'rating'"),
    (["pointwise.teacher_options={multitask: moe}"], "teacher (pointwise model 'dcnv2'): multitask must be one of"),
    (["pointwise.student_options={colour: 1}"], "pointwise model 'fm' has no option 'colour'"),
])
def test_pointwise_mistakes_name_the_key(extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [*POINTWISE, *extra])


def test_ranking_task_refuses_a_pointwise_model():
    with pytest.raises(ConfigError, match="teacher.name: 'dcnv2' is a pointwise model"):
        load_config(None, ["teacher.name=dcnv2"])


def test_without_a_validation_split_nothing_may_read_one():
    from kdray.tune.space import resolve_space, validate_space
    from kdray.tune.study import study_config

    no_valid = ["data.split_ratios=[0.9, 0, 0.1]"]
    with pytest.raises(ConfigError, match=r"leaves no validation split, so nothing can stop training early.*"
                                          r"teacher_train.patience \(now 5\) and student_train.patience \(now 10\) to 0"):
        load_config(None, no_valid)
    with pytest.raises(ConfigError, match=r"^data.split_ratios: .* set student_train.patience \(now 10\) to 0"):
        load_config(None, [*no_valid, "teacher_train.patience=0"])
    still = [*no_valid, "teacher_train.patience=0", "student_train.patience=0"]
    with pytest.raises(ConfigError, match="no validation split for the teacher search.*teacher_search.enabled=false"):
        load_config(None, still)
    cfg = load_config(None, [*still, "teacher_search.enabled=false"])
    assert not cfg.has_validation and load_config(None, []).has_validation
    with pytest.raises(ConfigError, match="the study picks every arm's winner on validation"):
        study_config(cfg)
    with pytest.raises(ConfigError, match="tune picks its winner on validation"):
        validate_space(cfg, resolve_space(cfg))
    with pytest.raises(ConfigError, match="task='pointwise' needs"):
        load_config(None, [*still, "teacher_search.enabled=false", "task=pointwise", "data.source=ml-100k",
                           "data.path=/somewhere"])
