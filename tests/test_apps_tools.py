"""The set-ups the page hands out, run by the tools they are for, against a real server.

Every test makes its token on the page (tests/test_page_apps.py) and takes the
set-up text exactly as the page gives it: the downloaded .sxcu, the copied
PicGo settings, the copied client.py and curl lines.

- PicGo: the real PicGo CLI with picgo-plugin-web-uploader (npm). PicGo reports
  success and exits 0 even when the upload failed, so the verdict comes from its
  output and from the server, never from its exit code. Installed by .ci/run into
  IMGPROXY_PICGO_DIR (default ~/.cache/imgproxy-picgo); skipped without node or it.
- ShareX runs only on Windows: the .sxcu is checked against ShareX's custom
  uploader format (CustomUploaderItem in ShareX/ShareX) and the request it
  describes is made with urllib, reading the answer with ShareX's {json:...}
  syntax, by the small interpreter below.
- Typora: its custom-command contract (the image paths as arguments, the URLs on
  the last lines of stdout, in order) run through `sh -c` as Typora does.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import AppSetups, api, create_token_on_page
from helpers import clean_env, multipart
from imgproxy import DENIED_MESSAGE as DENIED

ROOT = Path(__file__).resolve().parent.parent
PICGO_DIR = Path(os.environ.get("IMGPROXY_PICGO_DIR", Path.home() / ".cache" / "imgproxy-picgo"))
PICGO_BIN = PICGO_DIR / "node_modules" / "picgo" / "bin" / "picgo"
PICGO_PLUGIN = PICGO_DIR / "node_modules" / "picgo-plugin-web-uploader"
URL_RE = re.compile(r"^https?://\S+/i/([0-9a-f]{32})\.[a-z]+$")


@pytest.fixture
def setups(open_page) -> AppSetups:
    tab = open_page()
    tab.sign_in()
    return create_token_on_page(tab, "tools")


def revoke(server, setups: AppSetups) -> None:
    status, _, data = api(server, "DELETE", f"/api/tokens/{setups.token_id}")
    assert status == 204, data


def image_md5s(server) -> set[str]:
    status, _, data = api(server, "GET", "/api/images?limit=100&offset=0")
    assert status == 200, data
    return {image["md5"] for image in json.loads(data)["images"]}


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def assert_serves_its_md5(url: str) -> None:
    match = URL_RE.match(url)
    assert match, url
    assert hashlib.md5(fetch(url)).hexdigest() == match.group(1)


# ---- ShareX ------------------------------------------------------------------------
# The custom uploader format as ShareX 13.7.1+ reads it, written from ShareX's
# sources (ShareX.UploadersLib/CustomUploader: CustomUploaderItem.cs for the keys,
# the Version checks and the name parser on headers; ShareXSyntaxParser.cs for
# {function:arg|arg} and "\"; CustomUploaderFunctionJson.cs for {json:path}; the
# enums for DestinationType, RequestMethod and Body).

SHAREX_KEYS = {"Version": str, "Name": str, "DestinationType": str, "RequestMethod": str,
               "RequestURL": str, "Parameters": dict, "Headers": dict, "Body": str, "Arguments": dict,
               "FileFormName": str, "Data": str, "URL": str, "ThumbnailURL": str, "DeletionURL": str,
               "ErrorMessage": str}
SHAREX_DESTINATIONS = {"ImageUploader", "TextUploader", "FileUploader", "URLShortener", "URLSharingService"}
SHAREX_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}
SHAREX_BODIES = {"None", "MultipartFormData", "FormURLEncoded", "JSON", "XML", "Binary"}


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def check_sxcu(sxcu: dict) -> list[str]:
    """What ShareX would refuse or misread in a custom uploader, as sentences."""
    problems = [f"unknown key {key}" for key in sxcu if key not in SHAREX_KEYS]
    problems += [f"{key} should be a {kind.__name__}" for key, kind in SHAREX_KEYS.items()
                 if key in sxcu and not isinstance(sxcu[key], kind)]
    for key in ("Parameters", "Headers", "Arguments"):
        if isinstance(sxcu.get(key), dict) and not all(isinstance(v, str) for v in sxcu[key].values()):
            problems.append(f"{key} values must be strings")
    version = sxcu.get("Version", "")
    if not re.fullmatch(r"\d+(\.\d+){1,3}", version) or version_tuple(version) <= (12, 3, 1):
        problems.append(f"Version {version!r}: ShareX refuses uploaders of 12.3.1 and older")
    elif version_tuple(version) <= (13, 7, 1):
        problems.append(f"Version {version}: 13.7.1 and older get the $...$ syntax migration")
    flags = {flag.strip() for flag in sxcu.get("DestinationType", "").split(",")}
    if not flags <= SHAREX_DESTINATIONS or "ImageUploader" not in flags:
        problems.append(f"DestinationType {sxcu.get('DestinationType')!r}")
    if sxcu.get("RequestMethod", "POST") not in SHAREX_METHODS:
        problems.append(f"RequestMethod {sxcu.get('RequestMethod')!r}")
    if sxcu.get("Body", "None") not in SHAREX_BODIES:
        problems.append(f"Body {sxcu.get('Body')!r}")
    if sxcu.get("Body") == "MultipartFormData" and not sxcu.get("FileFormName"):
        problems.append("MultipartFormData needs a FileFormName")
    if not sxcu.get("RequestURL"):
        problems.append("RequestURL is empty")
    # Header and argument values also pass ShareX's name parser, where %y, %mo... are dates.
    problems += [f"header {name} holds a %" for name, value in (sxcu.get("Headers") or {}).items() if "%" in value]
    return problems


class ShareXSyntax:
    r"""ShareX's {function:arg|arg} syntax with \ as escape (our reading of ShareXSyntaxParser)."""

    def __init__(self, response_text: str = "", file_name: str = ""):
        self.response_text = response_text
        self.file_name = file_name

    def parse(self, text: str) -> str:
        return self._parse(text or "", 0, in_function=False)[0]

    def _parse(self, text: str, start: int, in_function: bool) -> tuple[str, int]:
        out, escape, i = [], False, start
        while i < len(text):
            c = text[i]
            if not escape:
                if c == "{":
                    value, i = self._parse(text, i + 1, in_function=True)
                    out.append(value)
                    i += 1
                    continue
                if c in "}|":
                    break
                if c == "\\":
                    escape, i = True, i + 1
                    continue
                if in_function and c == ":":
                    args = []
                    while True:
                        value, i = self._parse(text, i + 1, in_function=False)
                        args.append(value)
                        if i >= len(text) or text[i] != "|":
                            break
                    return self.call("".join(out), args), i
            escape = False
            out.append(c)
            i += 1
        if in_function:
            return self.call("".join(out), []), i
        return "".join(out), i

    def call(self, name: str, args: list[str]) -> str:
        name = name.lower()
        if name == "response":
            return self.response_text
        if name == "filename":
            return self.file_name
        if name == "json":
            source, path = (args[0], args[1]) if len(args) > 1 else (self.response_text, args[0])
            return json_path(json.loads(source), path)
        raise ValueError(f"this checker does not know ShareX function {name!r}")


def json_path(document, path: str) -> str:
    """The $.a.b[0] subset of JSONPath that ShareX's {json:...} takes."""
    value = document
    for key, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path.removeprefix("$.")):
        value = value[int(index)] if index else value.get(key) if isinstance(value, dict) else None
        if value is None:
            return ""
    return "" if value is None else str(value)


def sharex_upload(sxcu: dict, path: Path) -> dict:
    """Do what ShareX does with an image for this uploader: {"ok", "url"} or {"ok", "error"}."""
    syntax = ShareXSyntax(file_name=path.name)
    url = syntax.parse(sxcu["RequestURL"])
    headers = {name: syntax.parse(value) for name, value in (sxcu.get("Headers") or {}).items()}
    assert sxcu["Body"] == "MultipartFormData"
    parts = [(f'Content-Disposition: form-data; name="{name}"', syntax.parse(value).encode())
             for name, value in (sxcu.get("Arguments") or {}).items()]
    parts.append((f'Content-Disposition: form-data; name="{sxcu["FileFormName"]}"; filename="{path.name}"\r\n'
                  "Content-Type: application/octet-stream", path.read_bytes()))
    body, content_type = multipart(parts)
    request = urllib.request.Request(url, data=body, method=sxcu.get("RequestMethod", "POST"),
                                     headers={**headers, "Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            ok, text = True, response.read().decode()
    except urllib.error.HTTPError as err:
        ok, text = False, err.read().decode()
    answer = ShareXSyntax(response_text=text, file_name=path.name)
    if ok:
        return {"ok": True, "url": answer.parse(sxcu["URL"]) if sxcu.get("URL") else text}
    return {"ok": False, "error": answer.parse(sxcu.get("ErrorMessage", ""))}


def test_sharex_syntax_reader_follows_sharex():
    syntax = ShareXSyntax(response_text='{"files": [{"url": "https://x/1.png"}], "error": "no"}', file_name="a.png")
    assert syntax.parse("{json:files[0].url}") == "https://x/1.png"
    assert syntax.parse("{json:$.error}") == "no"
    assert syntax.parse(r"name: {filename} \{literal\} a\|b") == "name: a.png {literal} a|b"
    assert syntax.parse("cut|here") == "cut"      # an unescaped | ends the text, as in ShareX
    assert check_sxcu({"Version": "13.0.0", "DestinationType": "Bogus", "Body": "MultipartFormData",
                       "RequestURL": "", "Headers": {"X": "%y"}, "Extra": 1}) == [
        "unknown key Extra", "Version 13.0.0: 13.7.1 and older get the $...$ syntax migration",
        "DestinationType 'Bogus'", "MultipartFormData needs a FileFormName", "RequestURL is empty",
        "header X holds a %"]


def test_sharex_uploader_from_the_page(setups, server, corpus, tmp_path):
    sxcu = json.loads(setups.sharex)
    assert check_sxcu(sxcu) == []
    assert setups.sharex_file_name.endswith(".sxcu")

    first = sharex_upload(sxcu, corpus / "hopper.gif")
    assert first["ok"], first
    assert_serves_its_md5(first["url"])
    again = sharex_upload(sxcu, corpus / "hopper.gif")
    assert again == first                                     # dedup: the same URL

    # A server refusal reaches ShareX's error box through {json:error}.
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    refused = sharex_upload(sxcu, text_file)
    assert not refused["ok"] and refused["error"]
    assert refused["error"] == json.loads(api(server, "PUT", "/upload/notes.png", body=b"not an image")[2])["error"]

    before = image_md5s(server)
    revoke(server, setups)
    after_revoke = sharex_upload(sxcu, corpus / "basn3p04.png")
    assert after_revoke == {"ok": False, "error": DENIED}
    assert image_md5s(server) == before


# ---- PicGo -------------------------------------------------------------------------

@pytest.fixture(scope="session")
def picgo_cli() -> list[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (apt-get install nodejs npm)")
    if not PICGO_BIN.is_file() or not PICGO_PLUGIN.is_dir():
        pytest.skip(f"PicGo CLI not found in {PICGO_DIR}: npm install --prefix {PICGO_DIR} "
                    "picgo@1.5.8 picgo-plugin-web-uploader@1.1.1 (see .ci/run)")
    return [node, str(PICGO_BIN)]


class PicGo:
    """One PicGo configuration folder (config.json, its plugin list, logs) under tmp_path."""

    def __init__(self, command: list[str], folder: Path, web_uploader: dict):
        self.command = command
        self.folder = folder
        folder.mkdir()
        (folder / "node_modules").symlink_to(PICGO_DIR / "node_modules", target_is_directory=True)
        # PicGo loads the plugins that its folder's package.json depends on.
        (folder / "package.json").write_text(json.dumps(
            {"name": "picgo-config", "private": True, "dependencies": {"picgo-plugin-web-uploader": "1.1.1"}}))
        self.config = folder / "config.json"
        self.config.write_text(json.dumps({
            "picBed": {"uploader": "web-uploader", "current": "web-uploader", "web-uploader": web_uploader},
            "picgoPlugins": {"picgo-plugin-web-uploader": True},
            "settings": {"language": "en"},
        }))

    def upload(self, *paths: Path) -> tuple[list[str], str]:
        """(the image URLs PicGo printed, its whole output)."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.folder),
               "FORCE_COLOR": "0", "NO_COLOR": "1"}
        done = subprocess.run([*self.command, "-c", str(self.config), "upload", *map(str, paths)],
                              capture_output=True, text=True, timeout=120, env=env, cwd=self.folder)
        output = done.stdout + done.stderr
        urls = [line.strip() for line in output.splitlines() if URL_RE.match(line.strip())]
        return urls, output


def test_picgo_web_uploader_from_the_page(picgo_cli, setups, server, corpus, tmp_path):
    settings = json.loads(setups.picgo)
    picgo = PicGo(picgo_cli, tmp_path / "picgo", settings)

    urls, output = picgo.upload(corpus / "hopper.gif")
    assert len(urls) == 1, output
    assert_serves_its_md5(urls[0])
    held = image_md5s(server)
    assert URL_RE.match(urls[0]).group(1) in held

    # The same file again: the server's dedup gives the same URL.
    again, output = picgo.upload(corpus / "hopper.gif")
    assert again == urls, output
    assert image_md5s(server) == held

    # Two at once, in order.
    pair, output = picgo.upload(corpus / "basn3p04.png", corpus / "testorig.jpg")
    assert len(pair) == 2 and pair[0] != pair[1], output
    for url in pair:
        assert_serves_its_md5(url)
    held = image_md5s(server)

    # Revoked: PicGo still says SUCCESS and exits 0, but prints no URL and the server stored nothing.
    revoke(server, setups)
    refused, output = picgo.upload(corpus / "lossless1.webp")
    assert refused == [], output
    assert image_md5s(server) == held
    assert setups.token not in "".join(p.read_text(errors="replace") for p in picgo.folder.glob("*.log"))


# ---- Typora custom command, scripts and curl -------------------------------------------

def user_command(line: str, client_path: Path) -> str:
    """The page's line with client.py where the user saved it."""
    assert "/path/to/client.py" in line
    return line.replace("/path/to/client.py", shlex.quote(str(client_path)))


def test_typora_custom_command_from_the_page(setups, server, corpus, tmp_path):
    # As the page says: client.py saved somewhere on its own, no config.json beside it.
    folder = tmp_path / "notes"
    folder.mkdir()
    client = folder / "client.py"
    shutil.copy(ROOT / "client.py", client)
    command = user_command(setups.client, client).replace("python3 ", shlex.quote(sys.executable) + " ", 1)
    images = [corpus / "hopper.gif", corpus / "basn3p04.png", corpus / "testorig.jpg"]
    # Typora appends each image path in double quotes and runs the line in a shell.
    typora_line = command + "".join(f' "{path}"' for path in images)
    env = clean_env(tmp_path, HOME=str(tmp_path / "home"))
    done = subprocess.run(["sh", "-c", typora_line], capture_output=True, text=True, timeout=120,
                          cwd=folder, env=env)
    assert done.returncode == 0, done.stderr
    urls = done.stdout.strip().splitlines()[-len(images):]
    assert len(urls) == len(images)
    for url, path in zip(urls, images):
        assert_serves_its_md5(url)
    assert [URL_RE.match(u).group(1) for u in urls] == [
        json.loads(api(server, "GET", f"/api/images/{hashlib.md5(p.read_bytes()).hexdigest()}")[2])["md5"]
        for p in images]
    assert setups.token not in done.stdout + done.stderr

    revoke(server, setups)
    held = image_md5s(server)
    done = subprocess.run(["sh", "-c", command + f' "{corpus / "lossless1.webp"}"'], capture_output=True,
                          text=True, timeout=120, cwd=folder, env=env)
    assert done.returncode == 1 and done.stdout.strip() == "", done.stdout
    assert DENIED in done.stderr and setups.token not in done.stderr
    assert image_md5s(server) == held


def test_curl_line_from_the_page(setups, server, corpus):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed (apt-get install curl)")
    line = setups.curl.replace("file=@screenshot.png", "file=@" + str(corpus / "hopper.gif"))
    done = subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    url = done.stdout.strip()
    assert_serves_its_md5(url)
    revoke(server, setups)
    done = subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=60)
    assert json.loads(done.stdout)["error"] == DENIED
