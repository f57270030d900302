"""`llamatailor ui`: a run's Eval page (metrics base vs tuned, probes, every test sample side by side with
its word differences from the reference, ordered, filtered, paged) in a real headless Chromium against the
real server: the numbers shown are the files'."""

import json
import shutil
from pathlib import Path

import httpx2 as httpx
import pytest
import sacrebleu
import yaml
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from ui_support import XSS, UiServer, by_id, click_and_load, console_errors, page_elements, screenshot

DEMO_EVAL = Path(__file__).resolve().parents[1] / "runs" / "demo" / "eval"  # `make demo`'s, when there

# (base_score, tuned_score) of the crafted run's 30 plain samples: distinct deltas tuned - base
SCORES = [(0.5, (index * 7 % 30) / 30) for index in range(30)]
BAD_LINE = 3  # the crafted samples.jsonl line that is not JSON


def shown(value):
    """A metric as the page prints it (the `number` filter)."""
    if value is None:
        return "—"
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def crafted_samples():
    """30 samples with known scores, one whose answer differs from its reference by known words, and one
    carrying markup; (line number, row) pairs, the line numbers as written around BAD_LINE."""
    rows = [
        {"id": f"s{i}", "prompt": f"p{i}", "reference": f"r{i}", "base": f"b{i}", "tuned": f"t{i}",
         "base_stopped": True, "tuned_stopped": i % 7 != 0, "base_score": b, "tuned_score": t}
        for i, (b, t) in enumerate(SCORES)
    ]  # fmt: skip
    rows.append(
        {"id": "diff", "prompt": "Where?", "reference": "the cat sat on the mat",
         "base": "the cat sat on the mat", "tuned": "the dog sat on the mat today",
         "base_stopped": True, "tuned_stopped": True, "base_score": 1.0, "tuned_score": 0.9}
    )  # fmt: skip
    rows.append(
        {"id": "xss", "prompt": f"Say {XSS}", "reference": "x", "base": "x", "tuned": XSS,
         "base_stopped": True, "tuned_stopped": True, "base_score": 1.0, "tuned_score": 1.0}
    )  # fmt: skip
    lines = [line if line < BAD_LINE else line + 1 for line in range(1, len(rows) + 1)]
    return list(zip(lines, rows, strict=True))


CRAFTED_METRICS = {
    "headline": "json_field_f1",
    "tuned_source": "runs/crafted/adapter",
    "base": {"count": 32, "json_field_f1": 0.25, "json_field_accuracy": {"module": 0.5, "required": 0.125},
             "runaway_share": 0.0, "memorised_share": 0.03125, "judge_score": None, "judge_unparsed": 2},
    "tuned": {"count": 32, "json_field_f1": 0.8125, "json_field_accuracy": {"module": 1.0, "required": 0.375},
              "runaway_share": 0.15625, "memorised_share": 0.0, "judge_score": 4.5, "judge_unparsed": 0},
    "groups": {"python": {"base": {"count": 20, "rouge_l": 0.3}, "tuned": {"count": 20, "rouge_l": 0.6123456}}},
    "training": {"verdict": "overfitting", "best_step": 20, "best_val_loss": 0.5, "last_step": 40,
                 "last_val_loss": 0.75, "val_rise_after_best": 0.5, "train_loss_at_best": 0.6,
                 "train_loss_last": 0.2},
}  # fmt: skip


def _copy_run(source, runs, name):
    shutil.copytree(source, runs / name)
    return runs / name


@pytest.fixture(scope="module")
def ui(tmp_path_factory, ui_finished_run):
    folder = tmp_path_factory.mktemp("ui-eval-page")
    runs = folder / "runs"
    _copy_run(ui_finished_run, runs, "tiny")
    crafted = _copy_run(ui_finished_run, runs, "crafted") / "eval"
    (crafted / "metrics.json").write_text(json.dumps(CRAFTED_METRICS))
    lines = [json.dumps(row) for _, row in crafted_samples()]
    lines.insert(BAD_LINE - 1, '{"id": "broken", "prompt": ')
    (crafted / "samples.jsonl").write_text("\n".join(lines) + "\n")
    shutil.rmtree(_copy_run(ui_finished_run, runs, "no-eval") / "eval")
    if DEMO_EVAL.is_dir():  # real numbers for the screenshot; the demo run itself is only read
        demo = runs / "demo"
        shutil.copytree(DEMO_EVAL, demo / "eval")
        for name in ("manifest.json", "config.yaml"):
            shutil.copy(DEMO_EVAL.parent / name, demo / name)
    server = UiServer(runs, log=folder / "ui.log")
    yield server, runs
    server.stop()


def _flat(metrics):
    for name, value in metrics["base"].items():
        if isinstance(value, dict):
            yield from ((f"{name}.{key}", value[key], metrics["tuned"][name][key]) for key in value)
        else:
            yield name, value, metrics["tuned"].get(name)


def _check_table(table, metrics, headline):
    for name, base, tuned in _flat(metrics):
        row = table.find_element(By.CSS_SELECTOR, f'tr[data-metric="{name}"]')
        assert row.find_element(By.CSS_SELECTOR, ".base").text == shown(base), name
        assert row.find_element(By.CSS_SELECTOR, ".tuned").text == shown(tuned), name
        delta = "" if base is None or tuned is None else f"{tuned - base:+.4g}"
        assert row.find_element(By.CSS_SELECTOR, ".delta").text == delta, name
        assert ("headline" in row.get_attribute("class").split()) == (name == headline)
        assert ("sub" in row.get_attribute("class").split()) == ("." in name)


def _all_sample_lines(browser, url):
    """The data-line of every sample shown, page after page (following the pager's next link)."""
    browser.get(url)
    lines = []
    while True:
        lines += [
            int(a.get_attribute("data-line"))
            for a in browser.find_elements(By.CSS_SELECTOR, "article.sample")
        ]
        following = browser.find_elements(By.ID, "next-page")
        if not following:
            return lines
        browser.get(following[0].get_attribute("href"))


@pytest.mark.parametrize("run", ["tiny", "crafted"])
def test_eval_page_shows_the_metrics_and_every_sample(ui, browser, run):
    server, runs = ui
    metrics = json.loads((runs / run / "eval" / "metrics.json").read_text())
    browser.get(f"{server.url}/runs/{run}/eval")
    assert browser.find_element(By.ID, "headline").text == metrics["headline"]
    _check_table(browser.find_element(By.ID, "metric-table"), metrics, metrics["headline"])
    for index, by_model in enumerate(metrics["groups"].values(), start=1):
        _check_table(browser.find_element(By.ID, f"group-{index}"), by_model, metrics["headline"])
    training = metrics["training"]
    assert browser.find_element(By.ID, "verdict").text == training["verdict"]
    for key, value in training.items():
        if key not in ("verdict", "reason"):
            assert browser.find_element(By.CSS_SELECTOR, f'tr[data-key="{key}"] td').text == shown(value)
    for probe in ("runaway_share", "memorised_share"):
        row = browser.find_element(By.CSS_SELECTOR, f'tr[data-probe="{probe}"]')
        assert row.find_element(By.CSS_SELECTOR, ".base").text.split(" (")[0] == shown(metrics["base"][probe])
        assert row.find_element(By.CSS_SELECTOR, ".tuned").text.split(" (")[0] == shown(
            metrics["tuned"][probe]
        )
    if run == "crafted":
        expected = [line for line, _ in crafted_samples()]
    else:
        expected = list(range(1, len((runs / run / "eval" / "samples.jsonl").read_text().splitlines()) + 1))
    assert browser.find_element(By.ID, "sample-total").text == str(len(expected))
    lines = _all_sample_lines(browser, f"{server.url}/runs/{run}/eval?order=file")
    assert lines == expected
    assert console_errors(browser) == []


@pytest.mark.parametrize("run", ["tiny", "crafted"])
def test_each_sample_names_the_metric_of_its_scores(ui, run):
    server, runs = ui
    headline = json.loads((runs / run / "eval" / "metrics.json").read_text())["headline"]
    html = httpx.get(f"{server.url}/runs/{run}/eval", params={"order": "file"}, timeout=30).text
    samples = [element for element in page_elements(html) if element.tag == "article"]
    labels = [
        label.text for sample in samples for label in sample.find("span") if "score-metric" in label.classes
    ]
    written = (
        len(crafted_samples())
        if run == "crafted"
        else len((runs / run / "eval" / "samples.jsonl").read_text().splitlines())
    )
    assert labels == [headline] * len(samples) and len(samples) == min(written, 25)
    assert by_id(html)["sample-metric"].text == headline
    if run == "tiny":  # what eval wrote: each answer scored alone with the headline metric
        fields = yaml.safe_load((runs / run / "config.yaml").read_text())["eval"]["json_fields"]
        for line in (runs / run / "eval" / "samples.jsonl").read_text().splitlines():
            row = json.loads(line)
            for model in ("base", "tuned"):
                assert row[f"{model}_score"] == pytest.approx(
                    answer_score(headline, row[model], row["reference"], fields), abs=1e-12
                )


def answer_score(metric, answer, reference, fields):
    """`metric` of one answer, computed here: sacrebleu's sentence chrF / 100, or the F1 of the answer's
    (field, value) pairs of `fields` against the reference's."""
    if metric == "chrf":
        return sacrebleu.sentence_chrf(answer, [reference]).score / 100
    assert metric == "json_field_f1"

    def pairs(text):
        try:
            value = json.loads(text)
        except ValueError:
            return set()
        return (
            {(k, json.dumps(value[k], sort_keys=True)) for k in fields if k in value}
            if isinstance(value, dict)
            else set()
        )

    got, wanted = pairs(answer), pairs(reference)
    return 2 * len(got & wanted) / (len(got) + len(wanted)) if got or wanted else 0.0


def test_the_sample_metric_names_are_what_eval_scores_each_answer_with():
    """SAMPLE_METRICS names the per-sample score by eval's headline: the headline metric of each answer."""
    from llamatailor.evaluate.metrics import example_score, headline_metric
    from llamatailor.ui.eval_view import SAMPLE_METRICS

    cases = {  # (json_fields, answer, reference): scores neither 0 nor 1, so another metric would differ
        None: ("the cat sat on a mat", "the cat sat on the mat"),
        ("a", "b"): ('{"a": 1, "b": 3, "c": 0}', '{"a": 1, "b": 2}'),
    }
    assert set(SAMPLE_METRICS) == {headline_metric(list(f) if f else None) for f in cases}
    for fields, (answer, reference) in cases.items():
        metric = headline_metric(list(fields) if fields else None)
        score = example_score(answer, reference, list(fields) if fields else None)
        assert 0 < score < 1 and score == pytest.approx(answer_score(metric, answer, reference, fields or []))


def test_a_line_that_is_not_json_is_named_with_its_number(ui, browser):
    server, _ = ui
    browser.get(f"{server.url}/runs/crafted/eval")
    problems = browser.find_element(By.ID, "eval-problems").text
    assert f"eval/samples.jsonl line {BAD_LINE}: not JSON" in problems
    assert console_errors(browser) == []


def test_worst_delta_first_best_first_and_regressions_only(ui, browser):
    server, _ = ui
    samples = crafted_samples()
    by_delta = sorted(samples, key=lambda pair: pair[1]["tuned_score"] - pair[1]["base_score"])
    assert _all_sample_lines(browser, f"{server.url}/runs/crafted/eval") == [line for line, _ in by_delta]
    assert len(browser.find_elements(By.CSS_SELECTOR, "article.sample")) == len(samples) - 25  # page 2
    browser.get(f"{server.url}/runs/crafted/eval")
    Select(browser.find_element(By.ID, "order")).select_by_value("best")
    Select(browser.find_element(By.ID, "only")).select_by_value("regressions")
    click_and_load(browser, browser.find_element(By.ID, "apply"))
    best_first = sorted(
        samples, key=lambda pair: pair[1]["tuned_score"] - pair[1]["base_score"], reverse=True
    )
    # ties (the diff sample and s6 both lose 0.1) keep the file's order
    regressions = [pair for pair in best_first if pair[1]["tuned_score"] < pair[1]["base_score"]]
    first = browser.find_element(By.CSS_SELECTOR, "article.sample")
    assert int(first.get_attribute("data-line")) == regressions[0][0]
    top = dict(samples)[regressions[0][0]]
    assert first.find_element(By.CSS_SELECTOR, ".base-score").text == f"{top['base_score']:.4g}"
    assert first.find_element(By.CSS_SELECTOR, ".tuned-score").text == f"{top['tuned_score']:.4g}"
    delta = top["tuned_score"] - top["base_score"]
    assert first.find_element(By.CSS_SELECTOR, ".delta").text == f"{delta:+.4g}"
    assert _all_sample_lines(browser, browser.current_url) == [line for line, _ in regressions]
    assert console_errors(browser) == []


def test_the_diff_marks_the_words_that_differ(ui, browser):
    server, _ = ui
    browser.get(f"{server.url}/runs/crafted/eval?order=file&page=2")
    sample = browser.find_element(By.CSS_SELECTOR, 'article.sample[data-id="diff"]')
    tuned = sample.find_element(By.CSS_SELECTOR, ".answer.tuned .text")
    assert [e.text for e in tuned.find_elements(By.CSS_SELECTOR, "ins.diff")] == ["dog", "today"]
    assert [e.text for e in tuned.find_elements(By.CSS_SELECTOR, "del.diff")] == ["cat"]
    assert tuned.text == "the cat dog sat on the mat today"
    base = sample.find_element(By.CSS_SELECTOR, ".answer.base .text")
    assert base.find_elements(By.CSS_SELECTOR, "ins, del") == []
    assert base.text == "the cat sat on the mat"
    assert console_errors(browser) == []


def test_markup_in_a_sample_renders_as_text(ui, browser):
    server, _ = ui
    browser.get(f"{server.url}/runs/crafted/eval?order=file&page=2")
    sample = browser.find_element(By.CSS_SELECTOR, 'article.sample[data-id="xss"]')
    assert sample.find_element(By.CSS_SELECTOR, ".prompt .text").text == f"Say {XSS}"
    assert [e.text for e in sample.find_elements(By.CSS_SELECTOR, ".answer.tuned ins.diff")] == [XSS]
    assert "<script>" in sample.text
    assert browser.find_elements(By.CSS_SELECTOR, "#samples script, #samples img") == []
    assert browser.title != "pwned"
    assert console_errors(browser) == []


def test_a_run_without_eval_says_to_run_it(ui, browser):
    server, _ = ui
    response = httpx.get(f"{server.url}/runs/no-eval/eval")
    assert response.status_code == 200
    browser.get(f"{server.url}/runs/no-eval/eval")
    assert "run eval first" in browser.find_element(By.ID, "no-eval").text
    assert browser.find_elements(By.ID, "samples") == []
    assert httpx.get(f"{server.url}/runs/no-eval/eval?candidate=..").status_code == 404
    assert httpx.get(f"{server.url}/runs/nothere/eval").status_code == 404
    assert console_errors(browser) == []


def test_eval_page_screenshot(ui, browser):
    server, runs = ui
    run = "demo" if (runs / "demo").is_dir() else "tiny"
    metrics = json.loads((runs / run / "eval" / "metrics.json").read_text())
    browser.get(f"{server.url}/runs/{run}/eval")
    _check_table(browser.find_element(By.ID, "metric-table"), metrics, metrics["headline"])
    assert console_errors(browser) == []
    screenshot(browser, "eval")
