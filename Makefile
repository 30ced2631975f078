# Thin targets: each calls the translator CLI (or pytest). Override variables on the command line:
#   make train RECIPE=recipes/multi30k/de_en.yaml DEVICE=cuda
# Outside a virtual environment the targets make one in .venv (a distribution's python3 and its venv module: on
# Debian and Ubuntu, apt install python3 python3-venv) and install translator there; inside one, they use it.
VENV    ?= .venv
ifdef VIRTUAL_ENV
PYTHON  ?= python
STAMP   := $(VIRTUAL_ENV)/.translator-installed
else
PYTHON  ?= $(VENV)/bin/python
STAMP   := $(VENV)/.translator-installed
endif
TRANSLATOR = $(PYTHON) -m translator.cli
DATA    ?= ../shared/data
DEVICE  ?= auto
RECIPE  ?= recipes/multi30k/en_de.yaml
RUN     ?= runs/$(basename $(notdir $(RECIPE)))
SPLIT   ?= test
LAST    ?= 5
INPUT   ?= /dev/stdin
OUTPUT  ?= /dev/stdout
HYP     ?= $(RUN)/eval/$(SPLIT).hyp.de
REF     ?= $(RUN)/eval/$(SPLIT).ref.de
DEMO_RUN     ?= runs/demo_multi30k_en_de
DEMO_STEPS   ?= 500
DEMO_MINUTES ?= 15

.PHONY: install test demo train prepare translate score evaluate average plot

# CPU torch 2.13.0 and this package with its test extras, once (again when pyproject.toml changes).
install: $(STAMP)
$(STAMP): pyproject.toml
	@if [ -z "$(VIRTUAL_ENV)" ] && [ ! -x $(VENV)/bin/python ]; then echo "making a virtual environment in $(VENV)"; \
		python3 -m venv $(VENV) || { echo "make: python3 -m venv failed; on Debian/Ubuntu: apt install python3-venv"; exit 1; }; fi
	$(PYTHON) -m pip install -q torch==2.13.0 -e ".[test]"
	touch $@

test: $(STAMP)
	$(PYTHON) -m pytest -q

# Train the Multi30k en->de recipe on the CPU for DEMO_STEPS (about 11 minutes on 2 cores; the learning rate
# cools down over the last 200; 4096-token batches, a warmup of 400, lr_scale 0.7, dropout 0.1, no word dropout and float32, the
# settings the demo was measured with), translate test2016 with beam 4 (no MBR, as measured), print sacreBLEU, and
# draw the learning curves. Multi30k comes from $(DATA), else from the Hugging Face hub. DEMO_MINUTES caps slow machines.
demo: $(STAMP)
	rm -rf $(DEMO_RUN)
	$(TRANSLATOR) train --config recipes/multi30k/en_de.yaml --data-dir $(DATA) --out $(DEMO_RUN) \
		--device cpu --max-steps $(DEMO_STEPS) --train.max_tokens=4096 --train.warmup=400 --train.lr_scale=0.7 --train.cooldown=200 \
		--model.dropout=0.1 --model.word_dropout=0 --train.precision=32 \
		--train.val_every=250 --max-minutes $(DEMO_MINUTES)
	$(TRANSLATOR) evaluate --model $(DEMO_RUN) --split test --data-dir $(DATA) --device cpu --mbr 0
	$(TRANSLATOR) plot $(DEMO_RUN)

train: $(STAMP)
	$(TRANSLATOR) train --config $(RECIPE) --data-dir $(DATA) --out $(RUN) --device $(DEVICE)

prepare: $(STAMP)
	$(TRANSLATOR) prepare --config $(RECIPE) --data-dir $(DATA) --out prepared/$(basename $(notdir $(RECIPE)))

translate: $(STAMP)
	$(TRANSLATOR) translate --model $(RUN) -i $(INPUT) -o $(OUTPUT) --device $(DEVICE)

evaluate: $(STAMP)
	$(TRANSLATOR) evaluate --model $(RUN) --split $(SPLIT) --data-dir $(DATA) --device $(DEVICE)

score: $(STAMP)
	$(TRANSLATOR) score --hyp $(HYP) --ref $(REF) --metrics bleu chrf

average: $(STAMP)
	$(TRANSLATOR) average --model $(RUN) --last $(LAST) -o $(RUN)/model.safetensors

plot: $(STAMP)
	$(TRANSLATOR) plot $(RUN)

# Benchmarks (write benchmarks/results/*.json and plots). BENCH_DEVICE=cuda on a GPU machine.
# On a GPU the Multi30k recipes train in bf16 (on this CPU fp32 is faster).
BENCH_DEVICE ?= cpu
BENCH_SUFFIX := $(if $(filter cuda,$(BENCH_DEVICE)),_cuda,)
BENCH_GPU_FLAGS := $(if $(filter cuda,$(BENCH_DEVICE)),--set train.precision=bf16-mixed,)
.PHONY: bench-multi30k bench-multi30k-de-en bench-decode bench-decode-ops bench-train bench-decoder-only bench-serve bench-speculative
bench-multi30k: $(STAMP)
	rm -rf runs/bench_multi30k_en_de$(BENCH_SUFFIX)
	$(PYTHON) benchmarks/multi30k.py --recipe recipes/multi30k/en_de.yaml --data-dir $(DATA) --device $(BENCH_DEVICE) $(BENCH_GPU_FLAGS)

bench-multi30k-de-en: $(STAMP)
	rm -rf runs/bench_multi30k_de_en$(BENCH_SUFFIX)
	$(PYTHON) benchmarks/multi30k.py --recipe recipes/multi30k/de_en.yaml --data-dir $(DATA) --device $(BENCH_DEVICE) $(BENCH_GPU_FLAGS)

# Decoding speed vs Hugging Face generate and CTranslate2 on a trained run (default: the en->de benchmark's);
# on a CPU also int8 (ours and CTranslate2's), on a GPU also with CUDA graphs.
BENCH_MODEL ?= runs/bench_multi30k_en_de
bench-decode: $(STAMP)
	$(PYTHON) benchmarks/decode_speed.py --model $(BENCH_MODEL) --data-dir $(DATA) --device $(BENCH_DEVICE) \
		$(if $(filter cuda,$(BENCH_DEVICE)),--cuda-graphs,--int8 --prepack)

# Load test of translator serve (1, 8, 32 clients; with and without dynamic batching) beside CTranslate2.
bench-serve: $(STAMP)
	$(PYTHON) benchmarks/serve.py --model $(BENCH_MODEL) --data-dir $(DATA)

# Self-speculative decoding: draft heads trained onto the run (its weights frozen), then greedy vs heads.
bench-speculative: $(STAMP)
	$(PYTHON) benchmarks/speculative.py --model $(BENCH_MODEL) --data-dir $(DATA) --device $(BENCH_DEVICE)

# Device operations per decoding step (what bounds small-model decoding on a GPU), counted on CPU.
bench-decode-ops: $(STAMP)
	$(PYTHON) benchmarks/decode_ops.py --model $(BENCH_MODEL) --data-dir $(DATA)

# Training tokens/s and MFU, transformer_base and _big, vs a same-size Hugging Face Marian (few steps on a CPU).
BENCH_STEPS ?= $(if $(filter cuda,$(BENCH_DEVICE)),20,3)
bench-train: $(STAMP)
	$(PYTHON) benchmarks/train_throughput.py --data-dir $(DATA) --device $(BENCH_DEVICE) --steps $(BENCH_STEPS)

# Decoder-only vs encoder-decoder translation, and speculative decoding (1800 steps: about 2 hours on the
# 2-core CPU, 4 minutes on an H100).
DECODER_ONLY_STEPS ?= 1800
bench-decoder-only: $(STAMP)
	$(PYTHON) benchmarks/decoder_only.py --data-dir $(DATA) --steps $(DECODER_ONLY_STEPS) --device $(BENCH_DEVICE)
