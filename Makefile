# `make demo` and `make test` set everything up on a fresh machine (a .venv at the repository root).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA := data/synthetic

.PHONY: demo test setup clean-demo constraints

setup: $(STAMP)

# Exactly the versions in constraints.txt, which the test suite passed with: a fresh machine next
# month installs what CI tested.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# Re-resolve every dependency to the newest release pyproject.toml allows, in a scratch venv, and
# record it in constraints.txt; then `make test` and commit the file if the suite passes.
constraints:
	rm -rf .venv-constraints && $(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install --quiet --upgrade pip
	.venv-constraints/bin/python -m pip install --quiet -e ".[dev]"
	head -2 constraints.txt > constraints.new
	.venv-constraints/bin/python -m pip freeze --exclude-editable >> constraints.new
	mv constraints.new constraints.txt
	rm -rf .venv-constraints

# The main job on the embedded synthetic data: every model family's quick experiment (2.5D SMP
# with the winners' skeleton-recall recipe, MONAI 3D, nnU-Net), an ensemble of the two strongest
# (the leaderboard's best two trained experiments), its post-processing tuned on its out-of-fold
# volumes, a submission with the leaderboard's best row (`best`: the tuned ensemble when it leads)
# and the leaderboard. About 6 minutes on 2 CPU cores after set-up. Finished runs are skipped on a
# rerun, killed ones resumed. The hole stitcher (experiments/quick/hole_stitcher.toml,
# unet25d_stitched.toml) is left out for time.
QUICK := unet25d monai_unet nnunet
TUNE_TRIALS := 30

demo: $(STAMP)
	$(BIN)/vlab data synth --out $(DEMO_DATA)
	$(BIN)/vlab data check $(DEMO_DATA)
	$(BIN)/vlab validate experiments/quick/*.toml
	$(BIN)/vlab plugins
	$(BIN)/vlab run $(foreach e,$(QUICK),experiments/quick/$(e).toml)
	$(BIN)/vlab ensemble experiments/quick/ensemble.toml --top 2
	$(BIN)/vlab tune experiments/quick/ensemble.toml --trials $(TUNE_TRIALS)
	$(BIN)/vlab submit best --input $(DEMO_DATA)/test_images --output runs/submission.zip
	$(BIN)/vlab leaderboard

# The suite in TEST_WORKERS processes, one test file to each at a time (a file's trained fixtures are
# built once); `make test TEST_WORKERS=1` runs it in this process alone.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

clean-demo:
	rm -rf $(DEMO_DATA) runs
