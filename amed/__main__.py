from amed.app.cli import main

main()
