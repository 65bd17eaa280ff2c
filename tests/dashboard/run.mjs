// Drives the sendguard dashboard in headless Chromium (Debian's package)
// through playwright-core, which downloads no browser. tests/dashboard.rs
// starts the real server, makes the data through SMTP and runs one phase of
// this script at a time:
//
//   node run.mjs PHASE
//
// Environment: SENDGUARD_URL (http://127.0.0.1:PORT), ADMIN_TOKEN,
// SUPPORT_TOKEN, SCREENSHOT_DIR, and per phase LOCKED (the mailbox in a
// timed lockout) and BLOCKED (the mailbox blocked permanently).
// Each check that fails ends the script with exit status 1 and a line
// "FAILED: ..."; on success the last line is "RESULT {json}".

import { chromium } from "playwright-core";
import { mkdtempSync, rmSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const base = required("SENDGUARD_URL");
const screenshots = required("SCREENSHOT_DIR");
const result = {};

function required(name) {
  const value = process.env[name];
  if (!value) fail(`environment variable ${name} is not set`);
  return value;
}

function fail(message) {
  console.log(`FAILED: ${message}`);
  process.exit(1);
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

async function launch() {
  const profile = mkdtempSync(join(tmpdir(), "sendguard-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    viewport: { width: 1280, height: 900 },
  });
  const errors = [];
  context.on("page", (page) => watch(page, errors));
  for (const page of context.pages()) watch(page, errors);
  const page = context.pages()[0] || await context.newPage();
  page.setDefaultTimeout(15000);
  return { context, page, errors, profile };
}

function watch(page, errors) {
  page.on("pageerror", (error) => errors.push(`page error: ${error.message}`));
  page.on("console", (message) => {
    // A refused request shows in the console as a failed resource load;
    // the tests make some on purpose, so only script errors count.
    if (message.type() === "error" && !message.text().startsWith("Failed to load resource")) {
      errors.push(`console error: ${message.text()}`);
    }
  });
}

async function shot(page, name) {
  mkdirSync(screenshots, { recursive: true });
  await page.screenshot({ path: join(screenshots, `${name}.png`), fullPage: true });
}

async function phoneShot(page, name) {
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(200);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  result[`${name}_horizontal_overflow_px`] = overflow;
  check(overflow <= 1, `${name}: the page is ${overflow} px wider than a 390 px phone screen`);
  await shot(page, `${name}-phone`);
  await page.setViewportSize({ width: 1280, height: 900 });
}

async function login(page, token) {
  await page.goto(base + "/");
  await page.getByLabel("Admin or support token").fill(token);
  await page.getByRole("button", { name: "Log in" }).click();
  await page.getByRole("navigation", { name: "Main" }).waitFor();
}

async function heading(page, text) {
  await page.getByRole("heading", { level: 1, name: text }).waitFor();
}

/** Reads the countdown of `mailbox`'s lockout on the overview, in seconds. */
async function countdownSeconds(page, mailbox) {
  const text = await page.getByRole("timer", { name: `Lockout of ${mailbox}` }).textContent();
  const match = /^(?:(\d+)h )?(\d+)m (\d+)s$/.exec(text.trim());
  check(match, `countdown of ${mailbox} reads ${JSON.stringify(text)}, not "Hh MMm SSs"`);
  return Number(match[1] || 0) * 3600 + Number(match[2]) * 60 + Number(match[3]);
}

/** Clicks "Export CSV" on the events page and returns the downloaded file's text. */
async function downloadCsv(page) {
  const [download] = await Promise.all([
    page.waitForEvent("download"),
    page.getByRole("button", { name: "Export CSV" }).click(),
  ]);
  const stream = await download.createReadStream();
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  return Buffer.concat(chunks).toString("utf8");
}

const phases = {
  // Admin: login, the lockout's countdown, the permanent block, the event
  // filters, the CSV export, and a screenshot of every page.
  async overview(page) {
    const locked = required("LOCKED");
    const blocked = required("BLOCKED");

    // A wrong token is refused on the form.
    await page.goto(base + "/");
    await page.getByLabel("Admin or support token").fill("not-the-token-0123456789");
    await page.getByRole("button", { name: "Log in" }).click();
    await page.getByText("login failed").waitFor();
    await shot(page, "login");
    await phoneShot(page, "login");

    // The overview redraws itself every second in this phase, and the
    // test counts the requests it makes for it.
    await page.addInitScript(() => { window.sendguardOverviewRefresh = 1000; });
    let overviewRequests = 0;
    page.on("request", (request) => {
      if (new URL(request.url()).pathname === "/api/v1/overview") overviewRequests += 1;
    });
    await login(page, required("ADMIN_TOKEN"));
    await heading(page, "Overview");
    await page.locator("#main").focus();
    const requestsBefore = overviewRequests;
    await page.waitForTimeout(3500);
    result.overview_redraws = overviewRequests - requestsBefore;
    check(result.overview_redraws >= 2,
      `the overview asked for new data ${result.overview_redraws} times in 3.5 s, expected every second`);
    result.role_badge = await page.locator("#role").textContent();
    const lockouts = page.getByRole("region", { name: "Active lockouts" });
    await lockouts.getByRole("link", { name: locked }).waitFor();
    const first = await countdownSeconds(page, locked);
    await page.waitForTimeout(2500);
    const second = await countdownSeconds(page, locked);
    result.countdown_first_s = first;
    result.countdown_second_s = second;
    check(second < first, `the countdown did not run: ${first} s, then ${second} s`);
    const permanent = page.getByRole("region", { name: "Permanent blocks" });
    await permanent.getByRole("link", { name: blocked }).waitFor();
    const near = page.getByRole("region", { name: "Close to the threshold" });
    const nearRow = near.getByRole("row").filter({ hasText: required("NEAR") });
    result.near_threshold_row = (await nearRow.textContent()).replace(/\s+/g, " ");
    await shot(page, "overview");
    await phoneShot(page, "overview");

    // The events report, filtered by type and mailbox.
    await page.getByRole("link", { name: "Events" }).click();
    await heading(page, "Events report");
    await page.getByLabel("Type").selectOption("lockout_started");
    await page.getByLabel("Mailbox").fill(locked);
    await page.getByRole("button", { name: "Apply filters" }).click();
    await page.waitForFunction(() => location.hash.includes("type=lockout_started"));
    await page.getByRole("heading", { level: 2, name: /^Events \(1\)/ }).waitFor();
    const rows = page.getByRole("table", { name: "Events, newest first" }).locator("tbody tr");
    result.filtered_rows = await rows.count();
    check(result.filtered_rows === 1, `${result.filtered_rows} rows after filtering, expected 1`);
    check((await rows.first().textContent()).includes(locked), "the filtered row is not the locked mailbox's");
    const chart = page.getByRole("img", { name: /strikes? and \d+ lockouts?/ });
    result.chart_title = await chart.locator("title").first().textContent();
    await page.getByLabel("Type").selectOption("");
    await page.getByLabel("Mailbox").fill("");
    await page.getByRole("button", { name: "Apply filters" }).click();
    await page.waitForFunction(() => !location.hash.includes("type="));
    await page.getByRole("img", { name: /strikes? and/ }).waitFor();
    result.chart_title_all = await page.getByRole("img", { name: /strikes? and/ }).locator("title").first().textContent();
    const csvText = await downloadCsv(page);
    result.csv_lines = csvText.trim().split("\n").length;
    check(csvText.startsWith("time,type,mailbox"), `the CSV export does not start with its header: ${csvText.slice(0, 80)}`);
    check(csvText.includes("lockout_started") && csvText.includes(locked), "the CSV export lacks the lockout");
    await shot(page, "events");
    await phoneShot(page, "events");

    // The report comes oldest first in pages, so the dashboard must follow
    // the Link header to reach the newest events. The server's first page
    // is made to announce a second page that contains one more, newer event.
    const pagedMailbox = "paged@example.org";
    await page.route("**/api/v1/events?**", async (route) => {
      const url = route.request().url();
      if (url.includes("after=999999999") && url.includes("format=csv")) {
        const body = "time,type,mailbox,key_client\n" + `${new Date().toISOString()},lockout_started,${pagedMailbox},\n`;
        await route.fulfill({ status: 200, contentType: "text/csv", body });
        return;
      }
      if (url.includes("after=999999999")) {
        const event = { time: new Date().toISOString(), type: "lockout_started", mailbox: pagedMailbox,
          key_client: null, id: 1000000000, level: 1 };
        await route.fulfill({ status: 200, contentType: "application/x-ndjson", body: JSON.stringify(event) + "\n" });
        return;
      }
      const response = await route.fetch();
      const next = new URL(url).pathname + new URL(url).search + "&after=999999999";
      await route.fulfill({ response, headers: { ...response.headers(), link: `<${next}>; rel="next"` } });
    });
    // Without a type filter, the list and the chart share one read.
    const eventReads = [];
    const countReads = (request) => { if (request.url().includes("/api/v1/events?")) eventReads.push(request.url()); };
    page.on("request", countReads);
    await page.goto(base + "/#/events?range=24h");
    await page.reload();
    await heading(page, "Events report");
    await page.getByRole("table", { name: "Events, newest first" }).waitFor();
    page.off("request", countReads);
    result.event_reads_unfiltered = eventReads.length;
    check(eventReads.length === 2, `the unfiltered events page read ${eventReads.length} pages, expected 2 (one page and the next one its Link names)`);

    await page.goto(base + "/#/events?range=24h&type=lockout_started");
    await page.reload();
    await heading(page, "Events report");
    const pagedRows = page.getByRole("table", { name: "Events, newest first" }).locator("tbody tr");
    await pagedRows.first().waitFor();
    result.paged_first_row = (await pagedRows.first().textContent()).replace(/\s+/g, " ");
    check(result.paged_first_row.includes(pagedMailbox),
      `the newest event, on the second page, is not listed first: ${result.paged_first_row}`);
    // The CSV export follows the Link header too, and keeps one header line.
    const pagedCsv = await downloadCsv(page);
    result.paged_csv_headers = pagedCsv.split("\n").filter((line) => line.startsWith("time,type,")).length;
    check(pagedCsv.includes(pagedMailbox), "the CSV export lacks the event of the second page");
    check(pagedCsv.includes(locked), "the CSV export lacks the events of the first page");
    check(result.paged_csv_headers === 1, `the CSV export holds ${result.paged_csv_headers} header lines, expected 1`);
    await page.unroute("**/api/v1/events?**");

    // An unknown time range in the address shows the last 24 hours, and
    // the Time select shows that range.
    for (const range of ["bogus", "constructor"]) {
      await page.goto(base + "/#/events?range=" + range);
      await heading(page, "Events report");
      const shown = await page.getByLabel("Time", { exact: true }).inputValue();
      check(shown === "24h", `range=${range} shows the Time select at ${shown}, not 24h`);
    }

    // An address with invalid percent-encoding shows an error, not a page
    // left over from before.
    await page.goto(base + "/#/mailbox/%E0%A4%A");
    await heading(page, "Something went wrong");
    result.broken_address_error = await page.getByRole("alert").filter({ hasText: "invalid" }).textContent();

    // The locked mailbox's page: strike ledger, history, owner, no
    // unblock action for the admin.
    await page.goto(base + "/#/mailbox/" + encodeURIComponent(locked));
    await heading(page, locked);
    await page.getByRole("region", { name: "Lockout history" }).getByText("lockout_started").waitFor();
    result.mailbox_bad_messages = await page.getByRole("table", { name: "Bad messages from this mailbox, newest first" })
      .locator("tbody tr").count();
    check(result.mailbox_bad_messages === 5, `${result.mailbox_bad_messages} bad messages listed for the locked mailbox, expected 5`);
    result.admin_unblock_buttons = await page.getByRole("button", { name: /Lift permanent block|Reset lockout count/ }).count();
    check(result.admin_unblock_buttons === 0, "an admin session offers the unblock action");
    // Nor does the API let an admin session lift the permanent block.
    result.admin_unblock_status = await page.evaluate(async (mailbox) => {
      const session = await (await fetch("/api/v1/session")).json();
      const response = await fetch(`/api/v1/mailboxes/${encodeURIComponent(mailbox)}/unblock`, { method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": session.csrf_token },
        body: JSON.stringify({ reason: "admin try" }) });
      return response.status;
    }, blocked);
    check(result.admin_unblock_status === 403, `an admin session's unblock answered ${result.admin_unblock_status}`);
    await shot(page, "mailbox");
    await phoneShot(page, "mailbox");

    // A mailbox of 64 + 1 + 73 characters without a space still fits a
    // phone's width.
    const longMailbox = "a".repeat(64) + "@" + "b".repeat(61) + ".example.org";
    await page.goto(base + "/#/mailbox/" + encodeURIComponent(longMailbox));
    await heading(page, longMailbox);
    await phoneShot(page, "mailbox-long");

    await page.getByRole("link", { name: "Devices" }).click();
    await heading(page, "Devices");
    await page.getByRole("region", { name: "Health by subnet" }).waitFor();
    await shot(page, "devices");
    await phoneShot(page, "devices");

    await page.getByRole("link", { name: "Settings" }).click();
    await heading(page, "Settings");
    await shot(page, "settings");
    await phoneShot(page, "settings");

    // A request that changes state with the cookie but without the CSRF
    // header is refused.
    result.csrf_missing_status = await page.evaluate(async () => {
      const response = await fetch("/api/v1/settings", { method: "PUT",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ synchronized_security: false, reason: "csrf test", author: "test" }) });
      return response.status;
    });
    check(result.csrf_missing_status === 403, `a cookie PUT without the CSRF header answered ${result.csrf_missing_status}`);

    // Keyboard navigation: from a fresh load, Tab reaches the skip link
    // first and then the main navigation, and Enter follows a link.
    await page.goto(base + "/#/overview");
    await page.reload();
    await heading(page, "Overview");
    await page.keyboard.press("Tab");
    result.first_tab_stop = await page.evaluate(() => document.activeElement.textContent);
    await page.keyboard.press("Tab");
    result.second_tab_stop = await page.evaluate(() => document.activeElement.textContent);
    await page.keyboard.press("Tab");
    await page.keyboard.press("Enter");
    await heading(page, "Events report");
    result.keyboard_reached_events = true;

    // The skip link moves the focus to the content and stays on the page.
    await page.goto(base + "/#/settings");
    await page.reload();
    await heading(page, "Settings");
    await page.keyboard.press("Tab");
    await page.keyboard.press("Enter");
    await page.waitForTimeout(500);
    result.after_skip_link = await page.evaluate(() => [location.hash, document.activeElement.id]);
    check(result.after_skip_link[0] === "#/settings", `the skip link left the settings page for ${result.after_skip_link[0]}`);
    check(result.after_skip_link[1] === "main", `the skip link moved the focus to ${result.after_skip_link[1]}, not main`);
    await heading(page, "Settings");

    await page.getByRole("button", { name: "Log out" }).click();
    await page.getByLabel("Admin or support token").waitFor();
    result.after_logout_status = await page.evaluate(async () => (await fetch("/api/v1/blocks")).status);
    check(result.after_logout_status === 401, `after logout the API answered ${result.after_logout_status}`);
  },

  // Support: read-only settings, lifting the permanent block.
  async unblock(page) {
    const blocked = required("BLOCKED");
    await login(page, required("SUPPORT_TOKEN"));
    result.role_badge = await page.locator("#role").textContent();

    // A timed lockout cannot be lifted early, so its page offers no form
    // that the server would refuse.
    // With the browser's clock two hours behind, the page still counts
    // down from the server's time.
    const locked = required("LOCKED");
    await page.clock.install({ time: Date.now() - 2 * 3600 * 1000 });
    await page.goto(base + "/#/mailbox/" + encodeURIComponent(locked));
    await page.reload();
    await heading(page, locked);
    result.skewed_countdown_s = await countdownSeconds(page, locked);
    check(result.skewed_countdown_s <= 3600,
      `with the browser's clock 2 h behind, the one-hour lockout shows ${result.skewed_countdown_s} s left`);
    const actions = page.getByRole("region", { name: "Support actions" });
    await actions.getByText("cannot be lifted early").waitFor();
    result.timed_lockout_buttons = await actions.getByRole("button").count();
    check(result.timed_lockout_buttons === 0, "a timed lockout's page offers a support action");

    await page.getByRole("link", { name: "Settings" }).click();
    await heading(page, "Settings");
    result.support_settings_forms = await page.getByRole("button", { name: "Save" }).count();
    check(result.support_settings_forms === 0, "a support session is offered to change settings");
    result.support_settings_status = await page.evaluate(async () => {
      const session = await (await fetch("/api/v1/session")).json();
      const response = await fetch("/api/v1/settings", { method: "PUT",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": session.csrf_token },
        body: JSON.stringify({ synchronized_security: false, reason: "support test", author: "support" }) });
      return response.status;
    });
    check(result.support_settings_status === 403, `support changed a setting: ${result.support_settings_status}`);

    await page.getByRole("link", { name: "Overview" }).click();
    await heading(page, "Overview");
    await page.getByRole("region", { name: "Permanent blocks" }).getByRole("link", { name: blocked }).click();
    await heading(page, blocked);
    await page.getByLabel("Reason (recorded)").fill("laptop reimaged, ticket 4711");
    await shot(page, "mailbox-support");
    await page.getByRole("button", { name: "Lift permanent block" }).click();
    await page.getByRole("region", { name: "Status" }).getByText("not blocked").waitFor();
    await page.getByRole("link", { name: "← Overview" }).click();
    await heading(page, "Overview");
    const permanent = page.getByRole("region", { name: "Permanent blocks" });
    await permanent.getByText("No mailbox is blocked permanently.").waitFor();
    result.blocked_links_after = await permanent.getByRole("link", { name: blocked }).count();
    check(result.blocked_links_after === 0, "the lifted block is still listed");
    await shot(page, "overview-after-unblock");
  },

  // Admin: turn synchronized security off in the settings page.
  async "sync-off"(page) {
    await login(page, required("ADMIN_TOKEN"));
    await page.getByRole("link", { name: "Settings" }).click();
    await heading(page, "Settings");
    const section = page.getByRole("region", { name: "Synchronized security" });
    await section.getByLabel("New value").selectOption("false");
    await section.getByLabel("Reason (recorded)").fill("endpoint console under maintenance");
    await section.getByLabel("Your name").fill("jdoe");
    await section.getByRole("button", { name: "Save" }).click();
    await page.getByRole("region", { name: "Synchronized security" })
      .getByText("set in the dashboard or API").waitFor();
    result.in_force = await page.locator('[data-setting="synchronized_security"]').textContent();
    check(result.in_force === "off", `synchronized security shows ${result.in_force} after saving off`);

    // An exclusion added on the settings page is listed with its source.
    const exclusions = page.getByRole("region", { name: "Exclusions" });
    await exclusions.getByLabel("Device id").fill(required("EXCLUDE"));
    // The reason is one long word, which must wrap on a phone's width.
    await exclusions.getByLabel("Reason").fill("build server, ticket " + "OPS-4711/".repeat(30));
    await exclusions.getByLabel("Your name").fill("jdoe");
    await exclusions.getByRole("button", { name: "Add exclusion" }).click();
    const excludedRow = page.getByRole("region", { name: "Exclusions" }).getByRole("row")
      .filter({ hasText: required("EXCLUDE") });
    await excludedRow.getByText("dashboard or API").waitFor();
    result.exclusion_row = (await excludedRow.textContent()).replace(/\s+/g, " ");
    check(result.exclusion_row.includes("OPS-4711/ (by jdoe)"), `the exclusion row lacks its reason: ${result.exclusion_row}`);
    await shot(page, "settings-changed");
    await phoneShot(page, "settings-changed");
  },

  // Admin, after a reload of the file: the override is still in force.
  async "after-reload"(page) {
    await login(page, required("ADMIN_TOKEN"));
    await page.getByRole("link", { name: "Settings" }).click();
    await heading(page, "Settings");
    const section = page.getByRole("region", { name: "Synchronized security" });
    await section.getByText("set in the dashboard or API").waitFor();
    result.in_force = await page.locator('[data-setting="synchronized_security"]').textContent();
    result.source_text = await section.locator("p").filter({ hasText: "set in the dashboard" }).textContent();
    check(result.in_force === "off", `after the reload synchronized security shows ${result.in_force}`);
    await shot(page, "settings-after-reload");

    // The devices page: a device whose heartbeats stopped is listed as
    // missing, a device that reports is not.
    const missingDevice = required("MISSING_DEVICE");
    const reportingDevice = required("REPORTING_DEVICE");
    await page.getByRole("link", { name: "Devices" }).click();
    await heading(page, "Devices");
    const missing = page.getByRole("region", { name: "Missing heartbeats" });
    await missing.getByText(missingDevice).waitFor();
    result.reporting_listed_missing = await missing.getByText(reportingDevice).count();
    check(result.reporting_listed_missing === 0, `${reportingDevice} reports but is listed as missing`);
    result.subnet_rows = await page.getByRole("table", { name: "Device health by subnet" }).locator("tbody tr").count();
    await shot(page, "devices-missing");
    await phoneShot(page, "devices-missing");

    // Removing an exclusion requires the admin's name, which the removal
    // event records.
    const exclusions = page.getByRole("region", { name: "Exclusions" });
    const removeButton = exclusions.getByRole("button", { name: `Remove the exclusion of ${required("EXCLUDE")}` });
    await removeButton.click();
    await exclusions.getByRole("alert").filter({ hasText: "Enter your name" }).waitFor();
    await exclusions.getByLabel("Your name").fill("jdoe");
    await removeButton.click();
    await page.getByRole("region", { name: "Exclusions" }).getByText("No device is excluded.").waitFor();
    result.exclusion_removed = true;
  },

  // Admin: an exclusion from the configuration file is lifted on the
  // settings page with a reason and a name, then reset to the file's.
  async "lift-exclusion"(page) {
    const device = required("EXCLUDE");
    await login(page, required("ADMIN_TOKEN"));
    await page.getByRole("link", { name: "Settings" }).click();
    await heading(page, "Settings");
    const exclusions = page.getByRole("region", { name: "Exclusions" });
    const row = () => page.getByRole("region", { name: "Exclusions" }).getByRole("row").filter({ hasText: device });
    await row().getByText("configuration file").waitFor();
    result.row_before = (await row().textContent()).replace(/\s+/g, " ");

    // Lifting requires a reason and a name first.
    const liftButton = exclusions.getByRole("button", { name: `Lift the exclusion of ${device}` });
    await liftButton.click();
    await exclusions.getByRole("alert").filter({ hasText: "Enter a reason" }).waitFor();
    await exclusions.getByLabel("Reason").fill("server compromised, ticket OPS-77");
    await exclusions.getByLabel("Your name").fill("jdoe");
    await liftButton.click();
    await row().getByText("lifted", { exact: true }).waitFor();
    result.row_lifted = (await row().textContent()).replace(/\s+/g, " ");
    check(result.row_lifted.includes("server compromised, ticket OPS-77 (lifted by jdoe"),
      `the lifted row lacks its reason and author: ${result.row_lifted}`);
    check(result.row_lifted.includes("lifts the configuration file exclusion"),
      `the lifted row does not name what it lifts: ${result.row_lifted}`);
    await shot(page, "settings-exclusion-lifted");

    // Reset: the file's exclusion is in force again.
    await page.getByRole("region", { name: "Exclusions" }).getByLabel("Your name").fill("jdoe");
    await row().getByRole("button", { name: `Reset the exclusion of ${device} to the configuration file` }).click();
    await row().getByRole("button", { name: `Lift the exclusion of ${device}` }).waitFor();
    result.row_reset = (await row().textContent()).replace(/\s+/g, " ");
    check(!result.row_reset.includes("lifted"), `the reset row still shows a lift: ${result.row_reset}`);
    check(result.row_reset.includes("configuration file"), `the reset row lacks its source: ${result.row_reset}`);
  },

  // Admin: an exclusion whose device left the devices file is listed and
  // can be removed.
  async "unknown-exclusion"(page) {
    const device = required("EXCLUDE");
    await login(page, required("ADMIN_TOKEN"));
    await page.getByRole("link", { name: "Devices" }).click();
    await heading(page, "Devices");
    const exclusions = page.getByRole("region", { name: "Exclusions" });
    const row = exclusions.getByRole("row").filter({ hasText: device });
    await row.getByText("not in the devices file").waitFor();
    await exclusions.getByLabel("Your name").fill("jdoe");
    await row.getByRole("button", { name: `Remove the exclusion of ${device}` }).click();
    await page.getByRole("region", { name: "Exclusions" }).getByText("No device is excluded.").waitFor();
    result.unknown_exclusion_removed = true;
  },
};

const phase = process.argv[2];
if (!phases[phase]) fail(`unknown phase ${JSON.stringify(phase)}; phases: ${Object.keys(phases).join(", ")}`);
const { context, page, errors, profile } = await launch();
try {
  await phases[phase](page);
  if (errors.length) throw new Error(`the page logged errors: ${errors.join("; ")}`);
  console.log("RESULT " + JSON.stringify(result));
} catch (error) {
  try { await shot(page, `failure-${phase}`); } catch (_) { /* the page may be gone */ }
  console.log(`FAILED: ${phase}: ${error.message.split("\n")[0]}`);
  console.log(JSON.stringify(result));
  process.exitCode = 1;
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
