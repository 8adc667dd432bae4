defmodule Thermex.Supervisor do
  @moduledoc false
  use Supervisor
  @vsn "@VSN@"

  def start_link do
    Supervisor.start_link(__MODULE__, [], name: __MODULE__)
  end

  @impl true
  def init([]) do
    children = [
      %{id: Thermex.State, start: {Thermex.State, :start_link, []}},
      %{id: Thermex.Http, start: {Thermex.Http, :start_link, []}}
    ]

    Supervisor.init(children, strategy: :one_for_one, max_restarts: 5, max_seconds: 10)
  end
end
