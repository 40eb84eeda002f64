"""What a user does in the UI, in a real browser: headless Chromium (Debian's package) driven by
Playwright opens the webserver, fills the launchpad with the documented job spec's config,
launches, waits for success, and opens the summary asset's plots. Screenshots are kept in
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
        "eps_to_extract": [0.01, 0.1], "which_to_keep": "hard"}}
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
        assert (out / "extraction/dedup_summary_0.1.csv").exists()

        page.goto(f"{dagster_web.url}/assets/dedup_summary", wait_until="networkidle")
        dismiss_community_dialog(page)
        for key in ("removed_vs_eps_plot", "cluster_size_histogram", "score_distribution"):
            row = page.locator("tr", has=page.get_by_text(key, exact=True))
            row.get_by_text("[Show Markdown]").click()
            dialog = page.get_by_role("dialog").filter(has=page.get_by_text(key, exact=True))
            img = dialog.locator('img[src^="data:image/png"]')
            img.wait_for(timeout=20000)
            width, height, complete = img.evaluate(
                "e => [e.naturalWidth, e.naturalHeight, e.complete]")
            assert complete and width > 200 and height > 100, key
            page.wait_for_timeout(500)  # let the dialog's fade-in finish for the screenshot
            page.screenshot(path=os.path.join(SHOTS, f"3-{key}.png"))
            dialog.get_by_role("button", name="Close").click()
            dialog.wait_for(state="detached")
        browser.close()
