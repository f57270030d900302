"""Shared fixtures: tiny random Llama models with real tokenizers, data files and run files."""

import os

# Before any Hugging Face library is imported: they read these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

from llamatailor.config import ModelSection
from llamatailor.models.loading import ChatTokenizer, prepare_tokenizer
from tiny_models import build_tiny_model, real_tokenizer

torch.set_num_threads(1)

GPU_SKIP_REASON = "needs a CUDA GPU (bench/gpu_check.sh runs these)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` are skipped, with the reason, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders of tiny random Llamas: ChatML (SmolLM2 tokenizer) and Llama 3 (128k tokenizer)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: build_tiny_model(kind, root / kind) for kind in ("chatml", "llama3")}


@pytest.fixture(scope="session")
def chatml(tiny_models: dict[str, Path]) -> ChatTokenizer:
    return _chat_tokenizer(tiny_models["chatml"])


@pytest.fixture(scope="session")
def llama3(tiny_models: dict[str, Path]) -> ChatTokenizer:
    return _chat_tokenizer(tiny_models["llama3"])


@pytest.fixture(scope="session")
def llama2() -> ChatTokenizer:
    return prepare_tokenizer(real_tokenizer("llama2"), ModelSection())


def _chat_tokenizer(folder: Path) -> ChatTokenizer:
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(folder), ModelSection(base=str(folder)))


@pytest.fixture(scope="session")
def ui_finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Path:
    """A finished tiny run (prepare, train, eval) for the UI tests, in <folder>/runs/tiny: its data holds
    markup, an e-mail address and a rejected record (tests/ui_support.py: ui_rows). Treat it as read-only."""
    from ui_support import finished_run

    return finished_run(tmp_path_factory.mktemp("ui-runs"), tiny_models["chatml"])


@pytest.fixture(scope="session")
def browser():  # type: ignore[no-untyped-def]
    """One headless Chromium per test worker (Selenium over Debian's chromedriver)."""
    from ui_support import start_browser

    driver = start_browser()
    yield driver
    driver.quit()


@pytest.fixture(autouse=True)
def _browser_starts_blank(request: pytest.FixtureRequest) -> None:
    """A browser test starts on a blank page with an empty console log: the page before it (still polling
    a run another test removed) cannot leak errors into this test's console_errors."""
    if "browser" in request.fixturenames:
        driver = request.getfixturevalue("browser")
        driver.get("about:blank")
        driver.get_log("browser")
