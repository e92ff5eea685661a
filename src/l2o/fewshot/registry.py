"""The few-shot methods, in one registry: ``l2o fewshot``, :func:`l2o.fewshot.load` and
``benchmarks/fewshot_omniglot.py`` take every method name, default, option and check from here.

Each method declares one :class:`MethodSpec` (its name, how to build it for training and
from a saved configuration, episodic meta-training or pre-training, its default
hyperparameters per dataset / configuration, the options it accepts, the benchmark's
default training length) and passes it to :func:`register`.

Adding a method
---------------

1. Write ``src/l2o/fewshot/<name>.py``: a :class:`l2o.fewshot.base.FewShotMethod` subclass
   (``method = "<name>"``, ``adapt``, ``config_dict``; ``from_config`` is inherited) and, at
   the end of the file, ``register(MethodSpec(name="<name>", cls=..., build=..., ...))``
   with ``from .registry import MethodSpec, register`` (see ``protonet.py``).
2. Add ``"<name>"`` to :data:`MODULES` below (the one import line: it fixes where the
   method is listed, e.g. in ``--method``'s choices).

That is all: ``l2o fewshot train|eval --method <name>``, ``l2o.fewshot.load`` and the
benchmark's ``--methods`` / ``--options`` / ``--steps`` then know it (the benchmark runs it
by default when its spec has ``bench_steps``).  Settings the other methods do not have go in
``options`` (plus ``option_types`` for the benchmark's ``--options`` and ``cli_arguments``
for new ``l2o fewshot train`` flags); ``tests/test_fewshot_registry.py`` registers a
complete example method.  A spec registered
from elsewhere (e.g. a test) works too; it is listed after the modules' methods and
:func:`unregister` removes it.

Meta-Learner LSTM, MAML / FOMAML, fine-tune and nearest-neighbour are declared in this
file (:func:`_builtin_specs`), beside ProtoNet's own ``protonet.py`` registration, only
because their modules were being edited by someone else when the registry was added;
moving each spec into its module changes nothing else.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import L2OError

#: The modules that register methods (imported on first use), in listing order.
MODULES = ("metalearner", "maml", "protonet", "baselines")

EPISODIC = "episodic"  # meta-trained on episodes by l2o.fewshot.train.EpisodicTrainer
PRETRAIN = "pretrain"  # Conv-4 pre-trained on all meta-train classes (cli.train_baseline)
#: Options of every episodic method (settings of the episodic trainer).
EPISODIC_OPTIONS = ("meta_lr_schedule", "meta_batch")


def flag(value: str) -> bool:
    """An --options switch: true/false (also 1/0, yes/no)."""
    word = value.strip().lower()
    if word in ("true", "1", "yes"):
        return True
    if word in ("false", "0", "no"):
        return False
    raise ValueError(f"not a switch: {value!r}")


#: Types of the per-method settings (the benchmark's ``--options``); a spec adds its own
#: with ``option_types``.
OPTION_TYPES: dict[str, Callable[[str], Any]] = {
    "steps": int,
    "meta_lr_schedule": str,
    "inner_steps": int,
    "inner_lr": float,
    "grad_scale": str,
    "meta_batch": int,
    "init_lr_scale": float,  # Meta-LSTM: meta-lr multiplier of c_0 alone
    "second_order": flag,  # Meta-LSTM: keep the learner's gradient in the meta-graph
    "train_ways": int,  # ProtoNet: classes per training episode
    "train_queries": int,  # ProtoNet: queries per class of training episodes
}
#: Settings every method has (the others belong to the methods that list them).
COMMON_OPTIONS = ("steps", "inner_steps")


def _no_hparams(dataset: str, ways: int, shots: int) -> dict:
    return {"inner_steps": None, "clip": None, "meta_batch": 1}


@dataclass(frozen=True)
class MethodSpec:
    """One few-shot method as the command line, the loader and the benchmark see it.

    * ``name``          the ``--method`` name (also the model's ``method`` attribute)
    * ``cls``           the :class:`FewShotMethod` class
    * ``build``         ``build(learner, hp, args) -> model`` for training: ``hp`` is
                        ``hparams(...)`` with the command line's overrides applied, ``args``
                        the parsed options (``seed``, ``second_order``, ... as attributes)
    * ``training``      :data:`EPISODIC` (meta-trained on episodes) or :data:`PRETRAIN`
    * ``hparams``       ``hparams(dataset, ways, shots) -> dict`` of starting
                        hyperparameters: ``inner_steps``, ``clip``, ``meta_batch`` and the
                        method's own (``inner_lr``, ``train_ways``, ...)
    * ``options``       the method-specific settings it accepts (the benchmark's
                        ``--options`` keys and the matching ``l2o fewshot train`` flags,
                        e.g. ``train_ways`` / ``--train-ways``); episodic methods also get
                        :data:`EPISODIC_OPTIONS`, every method :data:`COMMON_OPTIONS`
    * ``option_types``  types of settings :data:`OPTION_TYPES` does not know yet
    * ``cli_arguments`` extra ``l2o fewshot train`` flags: ``((flags...), add_argument
                        kwargs)`` pairs; giving one to another method is an error
    * ``from_config``   the model from a saved configuration (default ``cls.from_config``)
    * ``loads_from``    other methods whose checkpoints it can be built from (their
                        learner and weights, e.g. nearest-neighbour from fine-tune)
    * ``warm_start``    its learned initialisation can start from a pre-trained body
                        (``--init-from``; the benchmark's ``<name>+pretrained``)
    * ``bench_steps``   the benchmark's training length at ``--scale 1`` (episodes, or
                        pre-training minibatches); None: not trained by the benchmark
    * ``bench_from``    the benchmark evaluates it from that method's run instead
    """

    name: str
    cls: type
    build: Callable[..., Any]
    training: str = EPISODIC
    hparams: Callable[[str, int, int], dict] = _no_hparams
    options: tuple[str, ...] = ()
    option_types: dict[str, Callable[[str], Any]] = field(default_factory=dict)
    cli_arguments: tuple = ()
    from_config: Callable[[dict], Any] | None = None
    loads_from: tuple[str, ...] = ()
    warm_start: bool = False
    bench_steps: int | None = None
    bench_from: str | None = None

    def __post_init__(self):
        if self.training not in (EPISODIC, PRETRAIN):
            raise ValueError(f"{self.name}: training must be {EPISODIC!r} or {PRETRAIN!r}")

    @property
    def episodic(self) -> bool:
        return self.training == EPISODIC

    def all_options(self) -> tuple[str, ...]:
        """Every setting the benchmark's ``--options`` accepts for this method."""
        extra = EPISODIC_OPTIONS if self.episodic else ()
        return (*COMMON_OPTIONS, *extra, *self.options)

    def load_config(self, cfg: dict):
        return (self.from_config or self.cls.from_config)(cfg)


_SPECS: dict[str, MethodSpec] = {}
_SEQ: dict[str, int] = {}
_loaded = False


def register(spec: MethodSpec, replace: bool = False) -> MethodSpec:
    """Add ``spec``; a second method of the same name is an error unless ``replace``."""
    if spec.name in _SPECS and not replace:
        raise ValueError(f"few-shot method {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    _SEQ.setdefault(spec.name, len(_SEQ))
    return spec


def unregister(name: str) -> None:
    """Remove method ``name`` (e.g. a test's); unknown names are ignored."""
    _SPECS.pop(name, None)
    _SEQ.pop(name, None)


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in MODULES:
        importlib.import_module(f"{__package__}.{mod}")
    for spec in _builtin_specs():
        if spec.name not in _SPECS:
            register(spec)


def _order(spec: MethodSpec) -> tuple[int, int]:
    mod = spec.cls.__module__.rpartition(".")[2]
    pos = MODULES.index(mod) if spec.cls.__module__.startswith(__package__ + ".") else None
    return (len(MODULES) if pos is None else pos, _SEQ[spec.name])


def specs() -> tuple[MethodSpec, ...]:
    """Every registered method: the modules' in :data:`MODULES` order, then any others."""
    _load()
    return tuple(sorted(_SPECS.values(), key=_order))


def names() -> tuple[str, ...]:
    return tuple(s.name for s in specs())


def get(name: str) -> MethodSpec:
    _load()
    try:
        return _SPECS[name]
    except KeyError:
        raise L2OError(f"unknown few-shot method {name!r}; one of {', '.join(names())}") from None


def episodic() -> tuple[str, ...]:
    """Methods meta-trained on episodes."""
    return tuple(s.name for s in specs() if s.episodic)


def pretrained() -> tuple[str, ...]:
    """Methods built on a pre-trained Conv-4 (fine-tune and nearest-neighbour)."""
    return tuple(s.name for s in specs() if not s.episodic)


def warm_startable() -> tuple[str, ...]:
    """Methods whose learned initialisation can start from a pre-trained body."""
    return tuple(s.name for s in specs() if s.warm_start)


def option_types() -> dict[str, Callable[[str], Any]]:
    out = dict(OPTION_TYPES)
    for s in specs():
        for key, parse in s.option_types.items():
            out.setdefault(key, parse)
    return out


def option_methods() -> dict[str, tuple[str, ...]]:
    """``{setting: methods that have it}`` for the settings not every method has."""
    out: dict[str, tuple[str, ...]] = {}
    all_specs = specs()
    for key in option_types():
        if key in COMMON_OPTIONS:
            continue
        out[key] = tuple(s.name for s in all_specs if key in s.all_options())
    return out


def applies_to(methods: tuple[str, ...]) -> str:
    """``"a"``, ``"a and b"``, ``"a, b and c"``."""
    if len(methods) <= 1:
        return "".join(methods)
    return f"{', '.join(methods[:-1])} and {methods[-1]}"


# -- the methods whose modules do not register themselves (see the module docstring) --------
def _builtin_specs() -> tuple[MethodSpec, ...]:
    from .baselines import FineTune, NearestNeighbour
    from .maml import MAMLMethod
    from .metalearner import MetaLSTMMethod

    def metalstm_hparams(dataset: str, ways: int, shots: int) -> dict:
        """Reference spec section 4."""
        if dataset == "omniglot":  # the deleted official Omniglot configs
            steps = 20 if ways >= 20 else (15 if shots == 1 else 8)
        else:  # released miniImageNet configs
            steps = 12 if shots == 1 else 8
        return {"inner_steps": steps, "clip": 0.25, "meta_batch": 1}

    def build_metalstm(learner, hp: dict, args):
        return MetaLSTMMethod(
            learner,
            inner_steps=hp["inner_steps"],
            second_order=args.second_order,
            grad_scale=args.grad_scale,
            init_seed=args.seed,
        )

    def maml_hparams(dataset: str, ways: int, shots: int) -> dict:
        """MAML paper section 5.2."""
        if dataset == "omniglot":
            # Finn et al. use 1 step of lr 0.4 for 5-way (5 of 0.1 for 20-way), with transductive
            # BN.  Under the paper's support-running BN protocol a single large step leaves the
            # query with statistics gathered at theta_0, not theta_1: on meta-validation (5w1s,
            # 100 episodes) 5 steps of 0.1 gave 84.6% (MAML) / 86.2% (FOMAML) against 75.6% / 32.9%
            # for 1 step of 0.4, so 5 x 0.1 is the default for every Omniglot configuration.
            steps, lr = 5, 0.1
        else:
            steps, lr = 5, 0.01
        return {"inner_steps": steps, "inner_lr": lr, "clip": None, "meta_batch": 4}

    def build_maml(first_order: bool):
        def build(learner, hp: dict, args):
            return MAMLMethod(
                learner,
                inner_steps=hp["inner_steps"],
                inner_lr=hp["inner_lr"],
                first_order=first_order,
                init_seed=args.seed,
            )

        return build

    maml = {
        "cls": MAMLMethod,
        "hparams": maml_hparams,
        "options": ("inner_lr",),
        "warm_start": True,
        "bench_steps": 3000,
    }
    return (
        MethodSpec(
            name="meta-lstm",
            cls=MetaLSTMMethod,
            build=build_metalstm,
            hparams=metalstm_hparams,
            options=("grad_scale", "second_order", "init_lr_scale"),
            warm_start=True,
            bench_steps=1500,
        ),
        MethodSpec(name="maml", build=build_maml(False), **maml),
        MethodSpec(name="fomaml", build=build_maml(True), **maml),
        MethodSpec(
            name="finetune",
            cls=FineTune,
            build=lambda learner, hp, args: FineTune(learner),
            training=PRETRAIN,
            bench_steps=2000,
        ),
        MethodSpec(
            name="nearest-neighbour",
            cls=NearestNeighbour,
            build=lambda learner, hp, args: NearestNeighbour(learner),
            training=PRETRAIN,
            loads_from=("finetune",),
            bench_from="finetune",  # the same pre-trained body: evaluated from its run
        ),
    )
