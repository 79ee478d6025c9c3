// imgproxy upload page. Served as /static/app.js under a strict CSP
// (script-src 'self'), so: no inline handlers, no eval, no innerHTML with data.
// Every name shown here is user text and goes into the DOM via textContent.
"use strict";

(function () {
  var AUTH_KEY = "imgproxy.auth";   // sessionStorage: lives as long as this tab
  var USER_KEY = "imgproxy.user";
  var PAGE_SIZE = 12;
  var COPY_SIZES = [null, 1280, 640, 320];   // widths offered for copying; null: the original
  var GRID_WIDTH = 320;                      // "My images" shows this size, never the original
  var PARALLEL_UPLOADS = 3;
  var AUTH_MESSAGE = "该用户权限不足，请联系管理员";

  var state = {
    auth: null,          // "Basic ..." header value
    user: "",
    offset: 0,
    total: 0,
    queue: [],
    running: 0,
    pendingDelete: null
  };

  function $(id) { return document.getElementById(id); }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (key) {
        var value = attrs[key];
        if (value === null || value === undefined || value === false) return;
        if (key === "text") node.textContent = value;
        else if (key === "className") node.className = value;
        else node.setAttribute(key, value === true ? "" : String(value));
      });
    }
    (children || []).forEach(function (child) {
      if (child !== null && child !== undefined) node.appendChild(child);
    });
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  // ---- auth ---------------------------------------------------------------

  // btoa() only takes Latin-1; Basic credentials are sent as UTF-8 bytes.
  function basicAuth(user, password) {
    var bytes = new TextEncoder().encode(user + ":" + password);
    var binary = "";
    for (var i = 0; i < bytes.length; i++) binary += String.fromCharCode(bytes[i]);
    return "Basic " + btoa(binary);
  }

  // X-Requested-With tells the server to leave out WWW-Authenticate on a 401,
  // so a wrong password shows our message instead of the browser's own prompt.
  function apiHeaders() {
    var headers = { "X-Requested-With": "imgproxy-page", "Accept": "application/json" };
    if (state.auth) headers["Authorization"] = state.auth;
    return headers;
  }

  function api(method, path) {
    return fetch(path, {
      method: method,
      headers: apiHeaders(),
      credentials: "omit",
      cache: "no-store"
    }).then(function (response) {
      if (response.status === 204) return { status: 204, body: null };
      return response.text().then(function (text) {
        var body = null;
        try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
        return { status: response.status, body: body };
      });
    });
  }

  function showSignedIn() {
    $("signin").hidden = true;
    $("app").hidden = false;
    $("who").hidden = false;
    $("who-name").textContent = state.user;
    loadTokens();
  }

  function showSignIn(message) {
    $("app").hidden = true;
    $("who").hidden = true;
    $("signin").hidden = false;
    var error = $("signin-error");
    error.textContent = message || "";
    error.hidden = !message;
    $("signin-submit").disabled = false;
  }

  function signOut(message) {
    state.auth = null;
    state.user = "";
    sessionStorage.removeItem(AUTH_KEY);
    sessionStorage.removeItem(USER_KEY);
    state.queue = [];   // files not yet sent stay unsent
    clear($("uploads"));
    clear($("mine"));
    $("mine-status").textContent = "";
    $("mine-pager").hidden = true;
    clearApps();
    $("signin-password").value = "";
    showSignIn(message);
    $(message ? "signin-password" : "signin-user").focus();
  }

  function onSignIn(event) {
    event.preventDefault();
    var user = $("signin-user").value.trim();
    var password = $("signin-password").value;
    if (!user || !password) {
      showSignIn("Enter a user name and a password.");
      return;
    }
    var submit = $("signin-submit");
    submit.disabled = true;
    state.auth = basicAuth(user, password);
    state.user = user;
    // The list endpoint is the cheapest call that proves the credentials.
    api("GET", "/api/images?limit=" + PAGE_SIZE + "&offset=0").then(function (result) {
      submit.disabled = false;
      if (result.status === 200) {
        sessionStorage.setItem(AUTH_KEY, state.auth);
        sessionStorage.setItem(USER_KEY, user);
        $("signin-password").value = "";
        $("signin-error").hidden = true;
        showSignedIn();
        state.offset = 0;
        renderMine(result.body);
        $("file-input").focus();
      } else {
        state.auth = null;
        showSignIn(errorText(result.status, result.body));
        $("signin-password").select();
      }
    }, function () {
      state.auth = null;
      showSignIn("The server did not answer. Check the connection and try again.");
    });
  }

  // ---- formatting ---------------------------------------------------------

  function formatBytes(n) {
    if (typeof n !== "number" || !isFinite(n)) return "";
    if (n < 1024) return n + " B";
    if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KB";
    return (n / 1024 / 1024).toFixed(1) + " MB";
  }

  function formatDate(iso) {
    var date = new Date(iso);
    if (isNaN(date.getTime())) return String(iso || "");
    return date.toLocaleString(undefined, {
      year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit"
    });
  }

  function untilText(iso) {
    var ms = new Date(iso).getTime() - Date.now();
    if (isNaN(ms)) return "";
    if (ms <= 0) return "expired";
    var hours = ms / 3600000;
    if (hours < 1) return "in " + Math.max(1, Math.round(ms / 60000)) + " min";
    if (hours < 48) return "in " + Math.round(hours) + " h";
    return "in " + Math.round(hours / 24) + " days";
  }

  // URLs come from the server (built from base_url), but a link is still only
  // ever http(s).
  function safeUrl(url) {
    return /^https?:\/\//i.test(String(url)) ? String(url) : null;
  }

  function escapeHtml(text) {
    return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;")
      .replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }

  function markdownAlt(text) {
    return String(text).replace(/([\\\[\]])/g, "\\$1").replace(/[\r\n]+/g, " ");
  }

  function snippets(info) {
    var name = info.name || info.md5 || "image";
    return [
      { key: "url", label: "URL", text: info.url },
      { key: "markdown", label: "Markdown", text: "![" + markdownAlt(name) + "](" + info.url + ")" },
      { key: "html", label: "HTML", text: '<img src="' + escapeHtml(info.url) + '" alt="' + escapeHtml(name) + '">' },
      { key: "bbcode", label: "BBCode", text: "[img]" + info.url + "[/img]" }
    ];
  }

  // Words for a failed call, next to the file that caused it. The server's own
  // message comes along when it has one.
  function errorText(status, body) {
    var detail = body && typeof body.error === "string" ? body.error.trim() : "";
    var code = body && typeof body.code === "string" ? body.code : "";
    function says(lead, fallback) {
      return lead + ": " + (detail || fallback) + (/[.!?。]$/.test(detail || fallback) ? "" : ".");
    }
    switch (status) {
      case 401:
      case 403:
        return detail || AUTH_MESSAGE;
      case 413:
        if (code === "too_many_pixels") return says("Too many pixels", "the image is larger than the server allows");
        return says("Too large", "the file is bigger than the server accepts");
      case 415:
        return says("Not a supported image", "the server accepts JPEG, PNG, GIF, WebP, BMP, TIFF and ICO");
      case 400:
        return says("The server refused the upload", "bad request");
      case 429:
        return says("Too many failed sign-ins", "wait a minute and try again");
      case 404:
        return says("Not found", "it may have expired");
      case 0:
        return "Upload failed: the connection closed. The file may be larger than the server allows, or the server is unreachable.";
      default:
        if (status >= 500) return says("Server error " + status, "try again later");
        return says("Request failed (" + status + ")", "unexpected answer");
    }
  }

  // ---- copy ---------------------------------------------------------------

  var toastTimer = null;
  function toast(message) {
    var node = $("toast");
    node.textContent = message;
    node.classList.add("show");
    clearTimeout(toastTimer);
    toastTimer = setTimeout(function () { node.classList.remove("show"); }, 2200);
  }

  // navigator.clipboard exists only in secure contexts (https or localhost);
  // on plain http the hidden-textarea fallback still copies.
  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text).catch(function () { return legacyCopy(text); });
    }
    return legacyCopy(text);
  }

  function legacyCopy(text) {
    return new Promise(function (resolve, reject) {
      var area = el("textarea", { readonly: true, className: "clipboard-helper", "aria-hidden": "true" });
      area.value = text;
      document.body.appendChild(area);
      var focused = document.activeElement;
      area.select();
      var ok = false;
      try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
      document.body.removeChild(area);
      if (focused && focused.focus) focused.focus();
      if (ok) resolve(); else reject(new Error("copy failed"));
    });
  }

  function copyButton(snippet) {
    var button = el("button", {
      type: "button",
      className: "btn btn-small copy",
      "data-copy": snippet.key,
      "aria-label": "Copy " + snippet.label,
      text: snippet.label
    });
    button.addEventListener("click", function () {
      copyText(snippet.text).then(function () {
        button.setAttribute("data-copied", snippet.text);
        button.classList.add("done");
        setTimeout(function () { button.classList.remove("done"); }, 1500);
        toast("Copied " + snippet.label);
      }, function () {
        toast("Could not copy: select the text and copy it by hand.");
      });
    });
    return button;
  }

  // A size of an image: /i/{md5}/{width}, the format chosen by the browser's
  // Accept header (AVIF or WebP where it can show them). Null: the original.
  function variantUrl(url, width) {
    var match = /^(.*\/)([0-9a-f]{32})\.[a-z0-9]+$/.exec(String(url));
    return width && match ? match[1] + match[2] + "/" + width : url;
  }

  // The snippets for one size; HTML offers the double width to sharp screens.
  function sizedSnippets(info, width) {
    var url = variantUrl(info.url, width);
    var parts = snippets({ name: info.name, md5: info.md5, url: url });
    if (width && COPY_SIZES.indexOf(width * 2) >= 0) {
      var sharp = variantUrl(info.url, width * 2);
      parts.forEach(function (part) {
        if (part.key !== "html") return;
        part.text = '<img src="' + escapeHtml(url) + '" srcset="' + escapeHtml(url) + " 1x, " +
          escapeHtml(sharp) + ' 2x" alt="' + escapeHtml(info.name || info.md5 || "image") + '">';
      });
    }
    return parts;
  }

  // "My images": the link block with a size picker in front of the copy buttons.
  function sizedLinkBlock(info) {
    var parts = sizedSnippets(info, null);
    var nodes = linkBlock(info, parts);
    var row = nodes[1];
    var open = row.querySelector("a.open");
    var pick = el("select", { className: "size-pick", "aria-label": "Size to copy" },
      COPY_SIZES.map(function (width) {
        return el("option", { value: width || "", text: width ? width + " px" : "Original" });
      }));
    pick.addEventListener("change", function () {
      var width = parseInt(pick.value, 10) || null;
      var fresh = sizedSnippets(info, width);
      parts.forEach(function (part, i) { part.text = fresh[i].text; });
      nodes[0].value = variantUrl(info.url, width);
      open.setAttribute("href", safeUrl(nodes[0].value) || "");
    });
    row.insertBefore(pick, row.children[1]);
    return nodes;
  }

  // The link block every image card shows: URL, copy buttons, expiry.
  function linkBlock(info, parts) {
    parts = parts || snippets(info);
    var url = el("input", {
      type: "text", className: "url", readonly: true, value: info.url,
      "aria-label": "Image URL", spellcheck: "false"
    });
    url.addEventListener("focus", function () { url.select(); });
    var open = el("a", {
      className: "btn btn-small open", href: safeUrl(info.url), target: "_blank",
      rel: "noopener noreferrer", text: "Open ↗"
    });
    var buttons = el("div", { className: "copy-row", role: "group", "aria-label": "Link" },
      [el("span", { className: "copy-label", text: "Copy" })].concat(parts.map(copyButton), [open]));
    return [url, buttons];
  }

  function metaLine(info) {
    var bits = [];
    if (info.format) bits.push(info.format);
    if (info.width && info.height) bits.push(info.width + "×" + info.height);
    if (typeof info.size === "number") bits.push(formatBytes(info.size));
    return bits.join(" · ");
  }

  function viewsText(count) {
    if (typeof count !== "number") return "";
    return " · " + count + (count === 1 ? " view" : " views");
  }

  function expiryLine(info) {
    if (!info.expire_at) return null;
    return el("p", { className: "expiry" }, [
      document.createTextNode("Expires "),
      el("time", { datetime: info.expire_at, text: formatDate(info.expire_at) }),
      document.createTextNode(" (" + untilText(info.expire_at) + ")")
    ]);
  }

  // A preview that degrades to a label when the browser cannot show the
  // format (TIFF) or CSP blocks a base_url on another origin.
  function preview(src, alt, label) {
    var box = el("div", { className: "thumb" });
    var img = el("img", { alt: alt, decoding: "async" });
    img.addEventListener("error", function () {
      box.classList.add("no-preview");
      img.hidden = true;
      if (!box.querySelector(".thumb-label")) {
        box.appendChild(el("span", { className: "thumb-label", text: label || "no preview" }));
      }
    });
    img.addEventListener("load", function () {
      box.classList.remove("no-preview");
      img.hidden = false;
      var old = box.querySelector(".thumb-label");
      if (old) box.removeChild(old);
    });
    if (src) img.src = src;
    box.appendChild(img);
    return { box: box, img: img };
  }

  // ---- uploads ------------------------------------------------------------

  function addFiles(files) {
    if (!state.auth) {
      showSignIn("Sign in first, then add your images.");
      return;
    }
    var list = Array.prototype.slice.call(files || []);
    if (!list.length) return;
    list.forEach(function (file) {
      var item = uploadCard(file);
      $("uploads").insertBefore(item.card, $("uploads").firstChild);
      state.queue.push(item);
    });
    toast(list.length === 1 ? "Uploading 1 file" : "Uploading " + list.length + " files");
    pump();
  }

  function uploadCard(file) {
    var name = file.name || "image";
    var local = URL.createObjectURL(file);
    var thumb = preview(local, name, "no preview");
    var progress = el("progress", { max: 100, value: 0, "aria-label": "Upload progress of " + name });
    var status = el("p", { className: "status", text: "Waiting…" });
    var body = el("div", { className: "card-body" }, [
      el("p", { className: "name", text: name, title: name }),
      el("p", { className: "meta", text: formatBytes(file.size) }),
      progress,
      status
    ]);
    var card = el("li", { className: "card upload pending", "data-name": name }, [thumb.box, body]);
    return { file: file, name: name, local: local, thumb: thumb, card: card, body: body, progress: progress, status: status };
  }

  function pump() {
    while (state.running < PARALLEL_UPLOADS && state.queue.length) {
      state.running++;
      send(state.queue.shift());
    }
  }

  function send(item) {
    var form = new FormData();
    form.append("file", item.file, item.name);
    var xhr = new XMLHttpRequest();
    xhr.open("POST", "/upload");
    var headers = apiHeaders();
    Object.keys(headers).forEach(function (key) { xhr.setRequestHeader(key, headers[key]); });
    item.status.textContent = "Uploading…";
    xhr.upload.addEventListener("progress", function (event) {
      if (event.lengthComputable) {
        var pct = Math.round(event.loaded / event.total * 100);
        item.progress.value = pct;
        item.status.textContent = pct < 100 ? "Uploading… " + pct + "%" : "Checking the image…";
      }
    });
    xhr.addEventListener("load", function () {
      var body = null;
      try { body = JSON.parse(xhr.responseText); } catch (e) { body = null; }
      finish(item, xhr.status, body);
    });
    xhr.addEventListener("error", function () { finish(item, 0, null); });
    xhr.addEventListener("abort", function () { finish(item, 0, null); });
    xhr.send(form);
  }

  function finish(item, status, body) {
    state.running--;
    item.progress.value = 100;
    item.card.classList.remove("pending");
    if ((status === 200 || status === 201) && body && body.url) {
      showResult(item, status, body);
      refreshMineSoon();
    } else {
      item.card.classList.add("failed");
      item.progress.hidden = true;
      item.status.textContent = errorText(status, body);
      item.status.setAttribute("role", "alert");
      if (status === 401) {
        item.status.textContent = errorText(status, body) + " Sign out and sign in again.";
      }
    }
    pump();
  }

  function showResult(item, status, info) {
    var existed = status === 200 || info.status === "exists";
    item.card.classList.add(existed ? "exists" : "uploaded");
    item.card.setAttribute("data-md5", info.md5 || "");
    item.progress.hidden = true;
    item.status.textContent = "";
    item.status.appendChild(el("span", {
      className: "badge " + (existed ? "badge-exists" : "badge-new"),
      text: existed ? "Already there" : "Uploaded"
    }));
    item.status.appendChild(document.createTextNode(existed
      ? " This image was already stored; its expiry was renewed."
      : " New image stored."));
    item.body.querySelector(".meta").textContent = metaLine(info);
    linkBlock(info).forEach(function (node) { item.body.appendChild(node); });
    var expiry = expiryLine(info);
    if (expiry) item.body.appendChild(expiry);
    // Show the image as served at its public URL, so what you see is what the
    // link gives; the local copy covered the wait.
    var img = item.thumb.img;
    var revoke = function () { URL.revokeObjectURL(item.local); };
    img.addEventListener("load", revoke, { once: true });
    img.addEventListener("error", revoke, { once: true });
    img.classList.add("served");
    img.src = info.url;
  }

  // ---- drag, drop, paste --------------------------------------------------

  function hasFiles(event) {
    var types = event.dataTransfer && event.dataTransfer.types;
    return !!types && Array.prototype.indexOf.call(types, "Files") !== -1;
  }

  var dragDepth = 0;
  function onDragEnter(event) {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth++;
    if (state.auth) $("drop-overlay").hidden = false;
  }
  function onDragOver(event) {
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = state.auth ? "copy" : "none";
  }
  function onDragLeave(event) {
    if (!hasFiles(event)) return;
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) $("drop-overlay").hidden = true;
  }
  function onDrop(event) {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth = 0;
    $("drop-overlay").hidden = true;
    addFiles(event.dataTransfer.files);
  }

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function onPaste(event) {
    var data = event.clipboardData;
    if (!data || !state.auth) return;
    var files = [];
    Array.prototype.forEach.call(data.items || [], function (entry) {
      if (entry.kind === "file") {
        var file = entry.getAsFile();
        if (file) files.push(file);
      }
    });
    if (!files.length) return;   // ordinary text paste into a field
    event.preventDefault();
    // Screenshots arrive as "image.png"; give them a name worth keeping.
    var now = new Date();
    var stamp = now.getFullYear() + pad(now.getMonth() + 1) + pad(now.getDate()) + "-" +
      pad(now.getHours()) + pad(now.getMinutes()) + pad(now.getSeconds());
    files = files.map(function (file, i) {
      if (file.name && file.name !== "image.png") return file;
      var ext = (file.type.split("/")[1] || "png").replace(/[^a-z0-9]/gi, "");
      var name = "pasted-" + stamp + (files.length > 1 ? "-" + (i + 1) : "") + "." + ext;
      return new File([file], name, { type: file.type });
    });
    addFiles(files);
  }

  // ---- my images ----------------------------------------------------------

  var refreshTimer = null;
  function refreshMineSoon() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(function () {
      state.offset = 0;
      loadMine();
    }, 300);
  }

  function loadMine() {
    if (!state.auth) return Promise.resolve();
    $("mine-status").textContent = "Loading…";
    return api("GET", "/api/images?limit=" + PAGE_SIZE + "&offset=" + state.offset).then(function (result) {
      if (result.status === 200 && result.body) {
        renderMine(result.body);
      } else if (result.status === 401) {
        signOut(errorText(401, result.body));
      } else {
        $("mine-status").textContent = errorText(result.status, result.body);
      }
    }, function () {
      $("mine-status").textContent = "The server did not answer. Try Refresh.";
    });
  }

  function renderMine(body) {
    var images = (body && Array.isArray(body.images)) ? body.images : [];
    var total = body && typeof body.total === "number" ? body.total : images.length;
    state.total = total;
    if (!images.length && state.offset > 0 && total > 0) {
      state.offset = Math.max(0, Math.floor((total - 1) / PAGE_SIZE) * PAGE_SIZE);
      loadMine();
      return;
    }
    var list = $("mine");
    clear(list);
    images.forEach(function (info) { list.appendChild(mineCard(info)); });
    $("mine-status").textContent = total ? "" : "No images yet. Upload one above.";
    var pager = $("mine-pager");
    pager.hidden = total <= PAGE_SIZE;
    $("mine-range").textContent = images.length
      ? (state.offset + 1) + "–" + (state.offset + images.length) + " of " + total
      : "";
    $("mine-prev").disabled = state.offset <= 0;
    $("mine-next").disabled = state.offset + images.length >= total;
  }

  function mineCard(info) {
    var name = info.name || info.md5;
    var thumb = preview(variantUrl(info.url, GRID_WIDTH), name, info.format || "no preview");
    thumb.img.setAttribute("loading", "lazy");
    var del = el("button", {
      type: "button", className: "btn btn-small btn-danger-quiet delete",
      "aria-label": "Delete " + name, text: "Delete"
    });
    del.addEventListener("click", function () { askDelete(info, del); });
    var body = el("div", { className: "card-body" }, [
      el("p", { className: "name", text: name, title: name }),
      el("p", { className: "meta", text: metaLine(info) + viewsText(info.access_count) })
    ].concat(sizedLinkBlock(info), [expiryLine(info), el("div", { className: "card-actions" }, [del])]));
    return el("li", { className: "card", "data-md5": info.md5 || "" }, [thumb.box, body]);
  }

  function askDelete(info, button) {
    state.pendingDelete = { info: info, button: button };
    $("confirm-text").textContent = "“" + (info.name || info.md5) + "” will be deleted, and its link " +
      info.url + " stops working unless someone else uploaded the same image. This cannot be undone.";
    var dialog = $("confirm");
    if (typeof dialog.showModal === "function") {
      dialog.showModal();
    } else {
      dialog.setAttribute("open", "");
    }
    $("confirm-cancel").focus();
  }

  function closeConfirm() {
    var dialog = $("confirm");
    if (dialog.open) {
      if (typeof dialog.close === "function") dialog.close(); else dialog.removeAttribute("open");
    }
  }

  function onConfirmCancel() {
    var pending = state.pendingDelete;
    state.pendingDelete = null;
    closeConfirm();
    if (pending && pending.button.isConnected) pending.button.focus();
  }

  function onConfirmOk() {
    var pending = state.pendingDelete;
    state.pendingDelete = null;
    closeConfirm();
    if (!pending) return;
    var md5 = String(pending.info.md5 || "");
    if (!/^[0-9a-f]{32}$/.test(md5)) return;
    pending.button.disabled = true;
    api("DELETE", "/api/images/" + md5).then(function (result) {
      if (result.status === 204 || result.status === 200 || result.status === 404) {
        toast("Deleted " + (pending.info.name || md5));
        loadMine().then(function () {
          var next = $("mine").querySelector("button.delete") || $("mine-refresh");
          next.focus();
        });
      } else {
        pending.button.disabled = false;
        toast(errorText(result.status, result.body));
      }
    }, function () {
      pending.button.disabled = false;
      toast("The server did not answer. Try again.");
    });
  }

  // ---- connect an app -----------------------------------------------------
  // Per-app tokens (POST/GET/DELETE /api/tokens, managed with the password the
  // tab signed in with) and ready-made set-ups for the token just made. The
  // secret lives only in this block's DOM until "Done", sign-out or reload:
  // never in storage, never in a URL (downloads are Blobs).

  var SHAREX_VERSION = "17.0.0";   // above 13.7.1, so ShareX reads the {json:...} syntax as written
  var appState = { tokens: [], shownId: null, pendingRevoke: null };

  function apiJson(method, path, payload) {
    var headers = apiHeaders();
    headers["Content-Type"] = "application/json";
    return fetch(path, {
      method: method,
      headers: headers,
      body: JSON.stringify(payload),
      credentials: "omit",
      cache: "no-store"
    }).then(function (response) {
      return response.text().then(function (text) {
        var body = null;
        try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
        return { status: response.status, body: body };
      });
    });
  }

  // ShareX reads {...} as functions, "|" as an argument separator and "\" as
  // an escape in every string of a custom uploader, so literal text escapes them.
  function sharexLiteral(text) {
    return String(text).replace(/[\\{}|]/g, "\\$&");
  }

  function shellQuote(text) {
    return "'" + String(text).replace(/'/g, "'\\''") + "'";
  }

  // Everything an app needs, built from the server this page came from (the
  // address the browser reaches, which is the one the apps on this machine reach).
  function appSetups(base, token, appName) {
    var uploadUrl = base + "/upload";
    var host = base.replace(/^https?:\/\//i, "");
    var sharex = {
      Version: SHAREX_VERSION,
      Name: "imgproxy " + host,   // shown in ShareX's list, not parsed
      DestinationType: "ImageUploader",
      RequestMethod: "POST",
      RequestURL: sharexLiteral(uploadUrl),
      Headers: { Authorization: sharexLiteral("Bearer " + token) },
      Body: "MultipartFormData",
      FileFormName: "file",
      URL: "{json:url}",
      ErrorMessage: "{json:error}"
    };
    var picgo = {
      url: uploadUrl,
      paramName: "file",
      jsonPath: "url",
      customHeader: JSON.stringify({ Authorization: "Bearer " + token }),
      customBody: ""
    };
    var slug = String(appName).toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 40);
    return {
      sharexFileName: "imgproxy" + (slug ? "-" + slug : "") + ".sxcu",
      sharex: JSON.stringify(sharex, null, 2) + "\n",
      picgo: JSON.stringify(picgo, null, 2),
      picgoFields: picgo,
      client: "IMGPROXY_URL=" + shellQuote(base) + " IMGPROXY_TOKEN=" + shellQuote(token) +
        " python3 /path/to/client.py",
      curl: "curl -H " + shellQuote("Authorization: Bearer " + token) +
        " -H 'Accept: text/plain' -F 'file=@screenshot.png' " + shellQuote(uploadUrl)
    };
  }

  function downloadText(filename, text, type) {
    var href = URL.createObjectURL(new Blob([text], { type: type }));
    var link = el("a", { href: href, download: filename, className: "visually-hidden" });
    document.body.appendChild(link);
    link.click();
    document.body.removeChild(link);
    setTimeout(function () { URL.revokeObjectURL(href); }, 30000);
  }

  function labelledCopy(key, label, text) {
    var button = copyButton({ key: key, label: label, text: text });
    button.textContent = "Copy " + label;
    return button;
  }

  function steps(lines) {
    return el("ol", { className: "setup-steps" }, lines.map(function (line) {
      return el("li", { text: line });
    }));
  }

  function codeBlock(text, label) {
    return el("pre", { className: "setup-code", tabindex: "0", "aria-label": label }, [
      el("code", { text: text })
    ]);
  }

  function setupPanels(setups) {
    var download = el("button", {
      type: "button", className: "btn btn-primary btn-small", "data-setup": "sharex-download",
      text: "Download " + setups.sharexFileName
    });
    download.addEventListener("click", function () {
      downloadText(setups.sharexFileName, setups.sharex, "application/json");
      toast("Saved " + setups.sharexFileName);
    });
    var picgoRows = Object.keys(setups.picgoFields).map(function (key) {
      var value = setups.picgoFields[key];
      return el("div", { className: "field-row" }, [
        el("dt", { text: key }),
        el("dd", null, [el("code", { text: value === "" ? "(leave empty)" : value })])
      ]);
    });
    return [
      { key: "sharex", label: "ShareX", body: [
        steps([
          "Download the file below and open it: ShareX asks to add “imgproxy” as a custom uploader.",
          "In ShareX choose Destinations → Image uploader → Custom image uploader.",
          "Take a screenshot: the link is copied when the upload finishes."
        ]),
        el("div", { className: "copy-row" }, [download, labelledCopy("sharex", "ShareX file", setups.sharex)]),
        codeBlock(setups.sharex, "ShareX custom uploader")
      ] },
      { key: "picgo", label: "PicGo", body: [
        steps([
          "In PicGo, open Plugins, search for web-uploader and install it.",
          "Open the picture bed settings for 自定义Web图床 (custom web uploader) and fill in the fields below, or copy them as JSON into picBed.web-uploader of PicGo's config file.",
          "Typora, Obsidian and VS Code can then upload through PicGo."
        ]),
        el("dl", { className: "fields" }, picgoRows),
        el("div", { className: "copy-row" }, [labelledCopy("picgo", "PicGo settings", setups.picgo)]),
        codeBlock(setups.picgo, "PicGo web-uploader settings")
      ] },
      { key: "client", label: "Typora & scripts", body: [
        steps([
          "Save client.py from this project next to your notes or scripts, and put its path in place of /path/to/client.py.",
          "Typora: Preferences → Image → Image Uploader → Custom Command, paste the line, then Test Uploader.",
          "Scripts and Obsidian's shell commands: the same line followed by image files prints one URL per line."
        ]),
        codeBlock(setups.client, "client.py command line"),
        el("div", { className: "copy-row" }, [labelledCopy("client", "command", setups.client)])
      ] },
      { key: "curl", label: "curl", body: [
        steps(["Replace screenshot.png with your file; the answer is the image's URL."]),
        codeBlock(setups.curl, "curl command"),
        el("div", { className: "copy-row" }, [labelledCopy("curl", "curl command", setups.curl)])
      ] }
    ];
  }

  function showSetups(setups) {
    var pick = $("setup-pick");
    var holder = $("setup-panels");
    clear(pick);
    clear(holder);
    var buttons = [];
    var panels = setupPanels(setups).map(function (setup) {
      var panel = el("div", {
        className: "setup-panel", id: "setup-" + setup.key, "data-setup-panel": setup.key,
        role: "region", "aria-label": setup.label + " set-up"
      }, setup.body);
      var button = el("button", {
        type: "button", className: "btn btn-small setup-choice", "data-setup-choice": setup.key,
        "aria-controls": panel.id, "aria-pressed": "false", text: setup.label
      });
      button.addEventListener("click", function () { choose(setup.key); });
      buttons.push(button);
      pick.appendChild(button);
      holder.appendChild(panel);
      return panel;
    });
    function choose(key) {
      buttons.forEach(function (b) {
        b.setAttribute("aria-pressed", b.getAttribute("data-setup-choice") === key ? "true" : "false");
      });
      panels.forEach(function (p) { p.hidden = p.getAttribute("data-setup-panel") !== key; });
    }
    choose("sharex");
  }

  function showNewToken(created) {
    var token = String(created.token || "");
    appState.shownId = String(created.id);
    $("token-new-name").textContent = created.name || "";
    $("token-secret").value = token;
    var slot = $("token-copy-slot");
    clear(slot);
    slot.appendChild(labelledCopy("token", "token", token));
    showSetups(appSetups(window.location.origin, token, created.name || ""));
    $("token-new").hidden = false;
    slot.querySelector("button").focus();
  }

  // Forget the secret: the block is emptied, not just hidden.
  function hideNewToken() {
    appState.shownId = null;
    $("token-new").hidden = true;
    $("token-secret").value = "";
    $("token-new-name").textContent = "";
    clear($("token-copy-slot"));
    clear($("setup-pick"));
    clear($("setup-panels"));
  }

  function tokenErrorText(status, body) {
    var detail = body && typeof body.error === "string" ? body.error.trim() : "";
    if (status === 400) return "The server refused the name: " + (detail || "use 1 to 100 characters") + ".";
    if (status === 401 || status === 403) return detail || AUTH_MESSAGE;
    if (status === 409 && detail) return detail;   // too many tokens: the server says how many
    return errorText(status, body);
  }

  function onCreateToken(event) {
    event.preventDefault();
    var input = $("token-name");
    var name = input.value.trim();
    var error = $("token-error");
    if (!name || name.length > 100) {
      error.textContent = "Give the app a name of 1 to 100 characters, such as “laptop ShareX”.";
      error.hidden = false;
      input.focus();
      return;
    }
    error.hidden = true;
    var submit = $("token-create");
    submit.disabled = true;
    apiJson("POST", "/api/tokens", { name: name }).then(function (result) {
      submit.disabled = false;
      if (result.status === 201 && result.body && result.body.token) {
        input.value = "";
        showNewToken(result.body);
        loadTokens();
      } else if (result.status === 401) {
        signOut(errorText(401, result.body));
      } else {
        error.textContent = tokenErrorText(result.status, result.body);
        error.hidden = false;
      }
    }, function () {
      submit.disabled = false;
      error.textContent = "The server did not answer. Try again.";
      error.hidden = false;
    });
  }

  function loadTokens() {
    if (!state.auth) return Promise.resolve();
    $("tokens-status").textContent = "Loading…";
    return api("GET", "/api/tokens").then(function (result) {
      if (result.status === 200 && result.body && Array.isArray(result.body.tokens)) {
        renderTokens(result.body.tokens);
      } else if (result.status === 401) {
        signOut(errorText(401, result.body));
      } else {
        $("tokens-status").textContent = tokenErrorText(result.status, result.body);
      }
    }, function () {
      $("tokens-status").textContent = "The server did not answer.";
    });
  }

  function renderTokens(tokens) {
    appState.tokens = tokens;
    var list = $("tokens");
    clear(list);
    tokens.forEach(function (token) { list.appendChild(tokenRow(token)); });
    $("tokens-status").textContent = tokens.length ? "" : "No tokens yet: apps you connect appear here.";
  }

  function tokenRow(token) {
    var name = String(token.name || "");
    var used = token.last_used_at
      ? [document.createTextNode(" · last used "), el("time", { datetime: token.last_used_at, text: formatDate(token.last_used_at) })]
      : [document.createTextNode(" · never used")];
    var revoke = el("button", {
      type: "button", className: "btn btn-small btn-danger-quiet revoke",
      "aria-label": "Revoke " + name, text: "Revoke"
    });
    revoke.addEventListener("click", function () { askRevoke(token, revoke); });
    return el("li", { className: "token", "data-token-id": String(token.id) }, [
      el("div", { className: "token-text" }, [
        el("p", { className: "name", text: name, title: name }),
        el("p", { className: "meta" }, [
          document.createTextNode("created "),
          el("time", { datetime: token.created_at, text: formatDate(token.created_at) })
        ].concat(used))
      ]),
      revoke
    ]);
  }

  function askRevoke(token, button) {
    appState.pendingRevoke = { token: token, button: button };
    $("revoke-text").textContent = "“" + token.name + "” stops working at once: the app that holds it can no longer " +
      "upload or see your images. Images it uploaded stay. This cannot be undone.";
    var dialog = $("revoke-confirm");
    if (typeof dialog.showModal === "function") dialog.showModal(); else dialog.setAttribute("open", "");
    $("revoke-cancel").focus();
  }

  function closeRevoke() {
    var dialog = $("revoke-confirm");
    if (dialog.open) {
      if (typeof dialog.close === "function") dialog.close(); else dialog.removeAttribute("open");
    }
  }

  function onRevokeCancel() {
    var pending = appState.pendingRevoke;
    appState.pendingRevoke = null;
    closeRevoke();
    if (pending && pending.button.isConnected) pending.button.focus();
  }

  function onRevokeOk() {
    var pending = appState.pendingRevoke;
    appState.pendingRevoke = null;
    closeRevoke();
    if (!pending) return;
    var id = String(pending.token.id);
    pending.button.disabled = true;
    api("DELETE", "/api/tokens/" + encodeURIComponent(id)).then(function (result) {
      if (result.status === 204 || result.status === 404) {
        toast("Revoked " + pending.token.name);
        if (appState.shownId === id) hideNewToken();
        loadTokens().then(function () {
          var next = $("tokens").querySelector("button.revoke") || $("token-name");
          next.focus();
        });
      } else if (result.status === 401) {
        signOut(errorText(401, result.body));
      } else {
        pending.button.disabled = false;
        toast(tokenErrorText(result.status, result.body));
      }
    }, function () {
      pending.button.disabled = false;
      toast("The server did not answer. Try again.");
    });
  }

  function clearApps() {
    hideNewToken();
    appState.tokens = [];
    clear($("tokens"));
    $("tokens-status").textContent = "";
    $("token-name").value = "";
    $("token-error").hidden = true;
  }

  function startApps() {
    $("token-form").addEventListener("submit", onCreateToken);
    $("token-done").addEventListener("click", function () {
      hideNewToken();
      $("token-name").focus();
    });
    $("apps-jump").addEventListener("click", function (event) {
      event.preventDefault();
      $("apps").scrollIntoView({ block: "start" });
      $("token-name").focus();
    });
    $("revoke-ok").addEventListener("click", onRevokeOk);
    $("revoke-cancel").addEventListener("click", onRevokeCancel);
    $("revoke-confirm").addEventListener("cancel", function (event) {
      event.preventDefault();
      onRevokeCancel();
    });
  }

  // ---- start --------------------------------------------------------------

  function start() {
    $("signin-form").addEventListener("submit", onSignIn);
    $("sign-out").addEventListener("click", function () { signOut(""); });
    $("file-input").addEventListener("change", function (event) {
      addFiles(event.target.files);
      event.target.value = "";
    });
    $("mine-refresh").addEventListener("click", function () { loadMine(); });
    $("mine-prev").addEventListener("click", function () {
      state.offset = Math.max(0, state.offset - PAGE_SIZE);
      loadMine();
    });
    $("mine-next").addEventListener("click", function () {
      if (state.offset + PAGE_SIZE < state.total) state.offset += PAGE_SIZE;
      loadMine();
    });
    $("confirm-ok").addEventListener("click", onConfirmOk);
    $("confirm-cancel").addEventListener("click", onConfirmCancel);
    $("confirm").addEventListener("cancel", function (event) {
      event.preventDefault();
      onConfirmCancel();
    });
    document.addEventListener("dragenter", onDragEnter);
    document.addEventListener("dragover", onDragOver);
    document.addEventListener("dragleave", onDragLeave);
    document.addEventListener("drop", onDrop);
    document.addEventListener("paste", onPaste);
    startApps();

    state.auth = sessionStorage.getItem(AUTH_KEY);
    state.user = sessionStorage.getItem(USER_KEY) || "";
    if (state.auth) {
      showSignedIn();
      loadMine();
    } else {
      showSignIn("");
      $("signin-user").focus();
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
