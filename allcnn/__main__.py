from allcnn.cli import main

main()
