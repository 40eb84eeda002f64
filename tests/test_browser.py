"""What a user does in the UI, in a real browser: headless Chromium (Debian's package) driven by
Playwright opens the webserver, fills the launchpad with a job spec's config (scalar eps, as
documented), launches, waits for success, and opens the summary asset's plots; materialises all
assets over a range of centroids with the config given once; and launches a run on a bad input
whose page shows the command line's one-line error. Screenshots are kept in
$SEMDEDUP_SCREENSHOTS (default: build/screenshots)."""

import os
import re
import shutil

import pytest
import yaml

from semdedup_dagster.config import job_spec_to_run_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="apt-get install chromium")]
SHOTS = os.environ.get("SEMDEDUP_SCREENSHOTS", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "screenshots"))
# Flags for a sandboxed root session with no network beyond loopback.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def dismiss_community_dialog(page):
    try:
        page.get_by_role("button", name="Skip").click(timeout=8000)
    except playwright.TimeoutError:
        pass  # not shown this time


def test_launchpad_run_and_summary_plots(planted, dagster_web, tmp_path):
    folder, _ = planted
    os.makedirs(SHOTS, exist_ok=True)
    out = tmp_path / "browser-out"
    spec = {"pipeline": "semantic-dedup", "args": {
        "input_embeddings_path": str(folder), "output_path": str(out), "n_clusters": 6,
        "eps_to_extract": 0.01, "which_to_keep": "hard"}}
    config_yaml = yaml.safe_dump(job_spec_to_run_config(spec), sort_keys=False)

    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{dagster_web.url}/locations/semdedup/jobs/semdedup/playground",
                  wait_until="networkidle")
        dismiss_community_dialog(page)
        page.wait_for_selector(".CodeMirror")
        # The launchpad's editor is CodeMirror: set its text as a paste would.
        page.evaluate("(t) => document.querySelector('.CodeMirror').CodeMirror.setValue(t)",
                      config_yaml)
        page.get_by_text("No errors").wait_for(timeout=30000)  # the UI validated the config
        page.screenshot(path=os.path.join(SHOTS, "1-launchpad.png"))
        page.get_by_role("button", name="Launch Run").click()
        page.wait_for_url(re.compile(r".*/runs/[0-9a-f-]{36}.*"), timeout=60000)
        page.get_by_text("Success", exact=True).first.wait_for(timeout=300000)
        page.screenshot(path=os.path.join(SHOTS, "2-run-success.png"))
        assert (out / "extraction/dedup_summary_0.01.csv").exists()

        page.goto(f"{dagster_web.url}/assets/dedup_summary", wait_until="networkidle")
        dismiss_community_dialog(page)
        for key in ("removed_vs_eps_plot", "cluster_size_histogram", "score_distribution"):
            row = page.locator("tr", has=page.get_by_text(key, exact=True))
            row.get_by_text("[Show Markdown]").click()
            dialog = page.get_by_role("dialog").filter(has=page.get_by_text(key, exact=True))
            img = dialog.locator('img[src^="data:image/svg+xml"]')
            img.wait_for(timeout=20000)
            width, height, complete = img.evaluate(
                "e => [e.naturalWidth, e.naturalHeight, e.complete]")
            assert complete and width > 200 and height > 100, key
            page.wait_for_timeout(500)  # let the dialog's fade-in finish for the screenshot
            page.screenshot(path=os.path.join(SHOTS, f"3-{key}.png"))
            dialog.get_by_role("button", name="Close").click()
            dialog.wait_for(state="detached")
        browser.close()


def set_launchpad_config(page, text: str) -> None:
    """Replace the launchpad editor's text (the last CodeMirror: the asset launchpad is a dialog
    over the page), once the launchpad has scaffolded its own."""
    page.wait_for_selector(".CodeMirror")
    page.wait_for_timeout(1000)
    page.evaluate("(t) => { const e = document.querySelectorAll('.CodeMirror'); "
                  "e[e.length - 1].CodeMirror.setValue(t); }", text)


def test_materialize_all_with_one_config_and_a_failing_runs_one_line(planted, dagster_web,
                                                                    tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from dagster import DagsterInstance

    from semdedup_core.cli import main as cli_main
    from semdedup_dagster.partitions import register_centroids

    folder, _ = planted
    os.makedirs(SHOTS, exist_ok=True)
    out = tmp_path / "all-out"
    spec = {"pipeline": "semantic-dedup", "args": {
        "input_embeddings_path": str(folder), "output_path": str(out), "n_clusters": 6,
        "eps_to_extract": 0.01}}
    config_yaml = yaml.safe_dump(job_spec_to_run_config(spec), sort_keys=False)
    with DagsterInstance.from_config(str(dagster_web.home)) as instance:
        register_centroids(instance, 6)  # what a first kmeans_centroids materialisation does

    # A bad input: the run's page must show what `semdedup run` prints, in one line.
    bad = tmp_path / "bad" / "a.parquet"
    bad.parent.mkdir()
    emb = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    emb[3] = np.nan
    pq.write_table(pa.table({"id": [f"c{i}" for i in range(20)],
                             "embedding": pa.array(list(emb), pa.list_(pa.float32()))}), bad)
    assert cli_main(["run", "--input-embeddings-path", str(bad.parent), "--output-path",
                     str(tmp_path / "bad-out"), "--n-clusters", "2"]) == 1
    line = f"{bad}: embedding of id 'c3' contains NaN or inf"
    bad_yaml = yaml.safe_dump(job_spec_to_run_config({"pipeline": "dedup", "args": {
        "input_embeddings_path": str(bad.parent), "output_path": str(tmp_path / "bad-out"),
        "n_clusters": 2}}), sort_keys=False)

    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{dagster_web.url}/asset-groups/semdedup", wait_until="networkidle")
        dismiss_community_dialog(page)
        page.get_by_role("button", name="Materialize all").click()
        dialog = page.get_by_role("dialog").filter(has_text="Launchpad")
        dialog.get_by_text("Scaffold missing config").wait_for(timeout=30000)
        set_launchpad_config(page, config_yaml)  # the config, once, for every asset
        dialog.get_by_text("No errors").wait_for(timeout=30000)
        # The centroid range, as tags: every asset has a single-run backfill policy.
        dialog.get_by_role("button", name="Edit tags").click()
        tags = page.get_by_role("dialog").filter(has_text="Add tags to run")
        tags.get_by_placeholder("Tag Key").fill("dagster/asset_partition_range_start")
        tags.get_by_placeholder("Tag Value").fill("0")
        tags.get_by_text("Add custom tag").click()
        tags.get_by_placeholder("Tag Key").last.fill("dagster/asset_partition_range_end")
        tags.get_by_placeholder("Tag Value").last.fill("5")
        tags.get_by_role("button", name="Apply").click()
        page.screenshot(path=os.path.join(SHOTS, "4-materialize-all-launchpad.png"))
        dialog.get_by_role("button").filter(has_text="Materialize").last.click()
        page.get_by_role("button", name="Confirm").click()  # "without a partition": a range
        page.wait_for_url(re.compile(r".*/runs/[0-9a-f-]{36}.*"), timeout=60000)
        page.get_by_text("Success", exact=True).first.wait_for(timeout=300000)
        page.screenshot(path=os.path.join(SHOTS, "5-materialize-all-success.png"))
        assert (out / "extraction/dedup_summary_0.01.csv").exists()
        assert len(os.listdir(out / "extraction/semdedup_pruning_tables")) == 6

        page.goto(f"{dagster_web.url}/locations/semdedup/jobs/semdedup/playground",
                  wait_until="networkidle")
        dismiss_community_dialog(page)
        set_launchpad_config(page, bad_yaml)
        page.get_by_text("No errors").wait_for(timeout=30000)
        page.get_by_role("button", name="Launch Run").click()
        page.wait_for_url(re.compile(r".*/runs/[0-9a-f-]{36}.*"), timeout=60000)
        page.get_by_text("Failure", exact=True).first.wait_for(timeout=300000)
        page.get_by_text(line).first.wait_for(timeout=30000)
        page.screenshot(path=os.path.join(SHOTS, "6-failed-run-one-line.png"))
        assert not (tmp_path / "bad-out/clustering_results").exists()
        browser.close()
