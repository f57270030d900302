module llamatailor.test/ollama_template

go 1.19
