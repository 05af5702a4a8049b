// Alchemy: live progress of our long jobs (training, tagging, preprocessing, generating).
//
// Each tab has an element #alchemy_<panel>_progress holding a div.alchemy-progress. While a job runs this
// script polls `alchemy/progress` (JSON, see extensions_lib/ui/progress.py) about once a second and draws the
// bar, step count, loss, it/s, ETA, the loss curve and the latest preview into the panel of the tab that
// started the job. Start buttons call alchemyWatch(panel) from their _js hook; a job already running when
// the page opens is picked up on load. Nothing here touches elements outside our own ids and classes.
(function () {
    "use strict";

    var POLL_MS = 1000;
    var START_GRACE_MS = 30000; // how long to wait for a just-clicked job to show up as running
    var timer = null;
    var watch = null; // {since, sawActive} after a start button was pressed
    var shownPreview = {}; // panel -> preview_version on screen

    function root() {
        if (typeof gradioApp === "function") return gradioApp();
        var app = document.getElementsByTagName("gradio-app")[0];
        return app ? (app.shadowRoot || app) : document;
    }

    function panelElement(panel) {
        var host = root().querySelector("#alchemy_" + panel + "_progress");
        return host ? host.querySelector(".alchemy-progress") : null;
    }

    function part(el, cls, tag) {
        var found = el.querySelector("." + cls);
        if (!found) {
            found = document.createElement(tag || "div");
            found.className = cls;
            el.appendChild(found);
        }
        return found;
    }

    function skeleton(el) {
        var head = part(el, "alchemy-progress-head");
        part(head, "alchemy-progress-title", "span");
        part(head, "alchemy-progress-state", "span");
        part(part(el, "alchemy-progress-bar"), "alchemy-progress-fill");
        part(el, "alchemy-progress-stats");
        part(el, "alchemy-progress-message");
        part(el, "alchemy-progress-curve");
        var img = part(el, "alchemy-progress-preview", "img");
        img.alt = "latest preview";
    }

    function curveSvg(points) {
        if (!points || points.length === 0) return "";
        var w = 300, h = 90, pad = 4;
        var x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
        points.forEach(function (p) {
            x0 = Math.min(x0, p[0]); x1 = Math.max(x1, p[0]);
            y0 = Math.min(y0, p[1]); y1 = Math.max(y1, p[1]);
        });
        var dx = x1 > x0 ? x1 - x0 : 1, dy = y1 > y0 ? y1 - y0 : 1;
        var coords = points.map(function (p) {
            var x = pad + (p[0] - x0) / dx * (w - 2 * pad);
            var y = pad + (1 - (p[1] - y0) / dy) * (h - 2 * pad);
            return x.toFixed(1) + "," + y.toFixed(1);
        }).join(" ");
        return '<svg class="alchemy-loss-svg" viewBox="0 0 ' + w + " " + h + '" preserveAspectRatio="none" ' +
            'data-points="' + points.length + '"><polyline points="' + coords + '"/></svg>' +
            '<div class="alchemy-loss-range">loss ' + y0.toFixed(4) + " to " + y1.toFixed(4) +
            ", steps " + x0 + " to " + x1 + "</div>";
    }

    function render(p) {
        var el = panelElement(p.panel);
        if (!el) return;
        skeleton(el);
        el.dataset.state = p.state;
        el.dataset.job = p.job_id;
        el.dataset.step = p.step;
        el.dataset.total = p.total;
        el.querySelector(".alchemy-progress-title").textContent = p.title;
        el.querySelector(".alchemy-progress-state").textContent = p.state;
        el.querySelector(".alchemy-progress-fill").style.width =
            (p.fraction === null ? 0 : Math.round(p.fraction * 1000) / 10) + "%";
        var stats = [p.unit + " " + p.step + (p.total ? "/" + p.total : "")];
        if (p.loss !== null) stats.push("loss " + Number(p.loss).toFixed(4));
        if (p.it_per_s) stats.push(p.it_per_s.toFixed(2) + (p.unit === "step" ? " it/s" : " " + p.unit + "s/s"));
        if (p.active) stats.push("ETA " + p.eta);
        if (p.elapsed) stats.push("elapsed " + p.elapsed);
        el.querySelector(".alchemy-progress-stats").textContent = stats.join(" \u00b7 ");
        var message = el.querySelector(".alchemy-progress-message");
        message.textContent = p.error || p.message || "";
        message.classList.toggle("alchemy-progress-error", !!p.error);
        el.querySelector(".alchemy-progress-curve").innerHTML = curveSvg(p.loss_points);
        var img = el.querySelector(".alchemy-progress-preview");
        if (p.preview_version && shownPreview[p.panel] !== p.job_id + ":" + p.preview_version) {
            shownPreview[p.panel] = p.job_id + ":" + p.preview_version;
            img.src = "alchemy/progress/preview?v=" + encodeURIComponent(shownPreview[p.panel]);
        }
        img.hidden = !p.preview_version;
    }

    function schedule(ms) {
        if (timer === null) timer = setTimeout(poll, ms);
    }

    function poll() {
        timer = null;
        fetch("alchemy/progress", {cache: "no-store"})
            .then(function (r) { return r.ok ? r.json() : Promise.reject(new Error("HTTP " + r.status)); })
            .then(function (p) {
                if (p.job_id) render(p);
                if (p.active && watch) watch.sawActive = true;
                var waiting = watch && !watch.sawActive && Date.now() - watch.since < START_GRACE_MS;
                if (p.active || waiting) {
                    schedule(POLL_MS);
                } else {
                    watch = null;
                }
            })
            .catch(function () {
                // Server restarting or route missing: try again while a start is fresh, else give up quietly.
                if (watch && Date.now() - watch.since < START_GRACE_MS) schedule(POLL_MS * 2);
            });
    }

    // Called by a start button (see extensions_lib/ui/widgets.py watch_js) just before its request is sent.
    window.alchemyWatch = function (panel) {
        watch = {since: Date.now(), sawActive: false, panel: panel};
        schedule(300);
    };

    // Inside the WebUI our Train sub-tabs sit in the left half of its Train tab; the right half
    // (#ti_gallery_container) is where the built-in trainer shows its output. Each of our sub-tabs' right-hand
    // column (.alchemy-side-pane: progress, loss curve, preview, result) is moved there, shown while its
    // sub-tab is open, and the host's own (then empty) output is hidden meanwhile. Standalone there is no such
    // column and the panes stay beside their forms.
    function placeSidePanes() {
        var container = root().querySelector("#ti_gallery_container");
        if (!container) return;
        root().querySelectorAll(".alchemy-side-pane").forEach(function (pane) {
            if (pane.parentElement === container) return;
            var tab = pane.closest("[id^='alchemy_'][id$='_tab']");
            if (!tab) return;
            pane.dataset.alchemyTab = tab.id;
            container.insertBefore(pane, container.firstChild);
        });
        var active = false;
        container.querySelectorAll(".alchemy-side-pane").forEach(function (pane) {
            var tab = root().querySelector("#" + pane.dataset.alchemyTab);
            var shown = !!tab && tab.offsetParent !== null;
            if ((pane.style.display !== "none") !== shown) pane.style.display = shown ? "" : "none";
            active = active || shown;
        });
        if (container.classList.contains("alchemy-side-active") !== active) {
            container.classList.toggle("alchemy-side-active", active);
        }
    }

    function init() {
        schedule(0); // pick up a job that was already running when the page was opened
        placeSidePanes();
        if (typeof onUiUpdate === "function") {
            onUiUpdate(placeSidePanes); // the WebUI calls this after DOM changes, e.g. a sub-tab switch
        } else if (typeof MutationObserver === "function") {
            new MutationObserver(placeSidePanes).observe(root(), {childList: true, subtree: true,
                attributes: true, attributeFilter: ["style", "class"]});
        }
    }

    window.alchemyPlaceSidePanes = placeSidePanes;

    if (typeof onUiLoaded === "function") {
        onUiLoaded(init); // inside the WebUI
    } else {
        init(); // standalone: the app runs this file once the page has loaded
    }
})();
