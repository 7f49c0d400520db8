"""How ctprofd opens and writes files: only regular files of bounded size, checked on the
open descriptor (`regular`); the files a target controls, opened once and never through a
symlink its owner could plant (`target`); writes that readers see whole or not at all,
and state files still written on a full disk (`atomic`); one owner per directory (`lock`).

May import: nothing else from ctprofd."""
